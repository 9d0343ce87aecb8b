#!/usr/bin/env bash
# Run an experiment on a Cloud TPU VM slice: every worker runs `python -m fm.main` and JAX's
# distributed runtime finds its peers from the TPU metadata (no coordinator flags needed).
#
#   launch/tpu_vm.sh --name NAME --zone ZONE [--project P] [--accelerator v5litepod-16]
#                    [--version v2-alpha-tpuv5-lite] [--create] [--dry-run]
#                    -- --config experiments/lm_news.py --workdir /mnt/shared/runs/lm_news
#
# Steps: (with --create) create the TPU VM; copy this checkout (git archive of HEAD) to every
# worker; install requirements.txt plus jax[tpu]; run fm.main on all workers at once.
# The workdir must be a directory that every worker reads and writes at the same path (a shared
# mount such as Filestore NFS or a gcsfuse-mounted bucket): checkpoints are written by all hosts.
set -euo pipefail
# The usage: the comment block at the top of this file.
usage() { awk 'NR == 1 { next } /^#SBATCH/ || !/^#/ { exit } { sub(/^# ?/, ""); print }' "$0"; }

name=""
zone=""
project=""
accelerator="v5litepod-16"
version="v2-alpha-tpuv5-lite"
create=0
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --accelerator) accelerator="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --create) create=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "error: unknown option $1; see the usage at the top of launch/tpu_vm.sh" >&2; exit 2 ;;
  esac
done
if [[ -z "$name" || -z "$zone" ]]; then
  echo "error: --name and --zone are required (the TPU VM and its zone)" >&2
  exit 2
fi
if [[ $# -eq 0 ]]; then
  echo "error: give fm.main's flags after --, e.g. -- --config experiments/lm_news.py --workdir /mnt/shared/run" >&2
  exit 2
fi

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$zone")
if [[ -n "$project" ]]; then
  where+=(--project "$project")
fi
archive="/tmp/fm-$(date +%s).tar.gz"
main_flags=$(printf '%q ' "$@")
remote="set -e; rm -rf ~/fm && mkdir -p ~/fm && tar -xzf ~/fm.tar.gz -C ~/fm && cd ~/fm"
remote+=" && python3 -m venv .venv && . .venv/bin/activate"
remote+=" && pip install --quiet -r requirements.txt 'jax[tpu]==0.10.2'"
remote+=" && python -m fm.main ${main_flags}"

steps=()
if [[ $create -eq 1 ]]; then
  steps+=("$(printf '%q ' "${gcloud_tpu[@]}" create "$name" "${where[@]}" --accelerator-type "$accelerator" --version "$version")")
fi
steps+=("git -C $(printf '%q' "$(cd "$(dirname "$0")/.." && pwd)") archive --format=tar.gz -o $(printf '%q' "$archive") HEAD")
steps+=("$(printf '%q ' "${gcloud_tpu[@]}" scp "$archive" "${name}:~/fm.tar.gz" "${where[@]}" --worker=all)")
steps+=("$(printf '%q ' "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$remote")")

for step in "${steps[@]}"; do
  echo "$step"
  if [[ $dry_run -eq 0 ]]; then
    eval "$step"
  fi
done
