#!/usr/bin/env bash
# Render launch/k8s/jobset.yaml for one run and submit it with kubectl (--dry-run: print the
# manifest and the command, submit nothing).
#
#   launch/k8s/jobset.sh --image IMAGE --config experiments/lm_news.py --workdir /runs/lm_news
#                        [--name fm-run] [--hosts 4] [--tpu tpu-v5-lite-podslice --topology 4x4
#                         --chips 4 | --gpu nvidia-h100-80gb --gpus 8] [--pvc fm-runs]
#                        [--mount /runs] [--max-restarts 3] [--dry-run] [-- EXTRA_FM_FLAGS...]
#
# The image must hold this checkout at /fm with requirements.txt and a TPU or CUDA build of jax
# installed; the workdir must lie on the shared volume (a ReadWriteMany claim mounted at
# --mount) because every host writes checkpoints.
set -euo pipefail
# The usage: the comment block at the top of this file.
usage() { awk 'NR == 1 { next } /^#SBATCH/ || !/^#/ { exit } { sub(/^# ?/, ""); print }' "$0"; }

name="fm-run"; image=""; config=""; workdir=""; hosts=4
tpu="tpu-v5-lite-podslice"; topology="4x4"; chips=4; gpu=""; gpus=8
pvc="fm-runs"; mount="/runs"; max_restarts=3; dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --image) image="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --hosts) hosts="$2"; shift 2 ;;
    --tpu) tpu="$2"; shift 2 ;;
    --topology) topology="$2"; shift 2 ;;
    --chips) chips="$2"; shift 2 ;;
    --gpu) gpu="$2"; shift 2 ;;
    --gpus) gpus="$2"; shift 2 ;;
    --pvc) pvc="$2"; shift 2 ;;
    --mount) mount="$2"; shift 2 ;;
    --max-restarts) max_restarts="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "error: unknown option $1; see the usage at the top of launch/k8s/jobset.sh" >&2; exit 2 ;;
  esac
done
for required in image config workdir; do
  if [[ -z "${!required}" ]]; then
    echo "error: --${required} is required" >&2
    exit 2
  fi
done

if [[ -n "$gpu" ]]; then
  node_selector="cloud.google.com/gke-accelerator: ${gpu}"
  resource="nvidia.com/gpu"; devices="$gpus"
  coordinator="--coordinator_address=${name}-workers-0-0.${name}:1234 --num_processes=${hosts} --process_id=\${JOB_COMPLETION_INDEX}"
else
  node_selector="{cloud.google.com/gke-tpu-accelerator: ${tpu}, cloud.google.com/gke-tpu-topology: ${topology}}"
  resource="google.com/tpu"; devices="$chips"; coordinator=""
fi
manifest=$(sed -e "s|\${NAME}|${name}|g" -e "s|\${IMAGE}|${image}|g" -e "s|\${CONFIG}|${config}|g" \
  -e "s|\${WORKDIR}|${workdir}|g" -e "s|\${HOSTS}|${hosts}|g" -e "s|\${PVC}|${pvc}|g" \
  -e "s|\${WORKDIR_MOUNT}|${mount}|g" -e "s|\${MAX_RESTARTS}|${max_restarts}|g" \
  -e "s|\${RESOURCE}|${resource}|g" -e "s|\${DEVICES_PER_HOST}|${devices}|g" \
  -e "s|\${NODE_SELECTOR}|${node_selector}|g" -e "s|\${COORDINATOR_FLAGS}|${coordinator}|g" \
  -e "s|\${EXTRA_FLAGS}|$*|g" "$(dirname "$0")/jobset.yaml")
if [[ $dry_run -eq 1 ]]; then
  echo "$manifest"
  echo "kubectl apply -f -"
  exit 0
fi
echo "$manifest" | kubectl apply -f -
