#!/usr/bin/env bash
# N JAX processes on this machine (127.0.0.1), each with fake CPU devices: the multi-host code
# path without a cluster. Used by the tests.
#
#   launch/local.sh [--processes N] [--devices D] [--port P] [--dry-run] -- FM_MAIN_FLAGS...
#   launch/local.sh --processes 2 --devices 4 -- --config experiments/lm_shakespeare.py:smoke --workdir /tmp/w
#
# Process i runs `python -m fm.main FLAGS --coordinator_address=127.0.0.1:P --num_processes=N
# --process_id=i` with XLA_FLAGS=--xla_force_host_platform_device_count=D (P: a free port unless
# given). Process 0 prints to this terminal; process i > 0 logs to
# ${LOG_DIR:-/tmp}/fm-local-P-i.log. Exits non-zero if any process fails.
set -euo pipefail
# The usage: the comment block at the top of this file.
usage() { awk 'NR == 1 { next } /^#SBATCH/ || !/^#/ { exit } { sub(/^# ?/, ""); print }' "$0"; }

processes=2
devices=4
port=""
dry_run=0
python="${PYTHON:-python}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --processes) processes="$2"; shift 2 ;;
    --devices) devices="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "error: unknown option $1; usage: launch/local.sh [--processes N] [--devices D] [--port P] [--dry-run] -- FM_MAIN_FLAGS..." >&2; exit 2 ;;
  esac
done
if [[ $# -eq 0 ]]; then
  echo "error: give fm.main's flags after --, e.g. -- --config experiments/lm_shakespeare.py:smoke --workdir /tmp/w" >&2
  exit 2
fi
if [[ -z "$port" ]]; then
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
log_dir="${LOG_DIR:-/tmp}"

commands=()
for ((i = 0; i < processes; i++)); do
  commands+=("XLA_FLAGS=--xla_force_host_platform_device_count=${devices} ${python} -m fm.main $(printf '%q ' "$@")--coordinator_address=127.0.0.1:${port} --num_processes=${processes} --process_id=${i}")
done
if [[ $dry_run -eq 1 ]]; then
  printf '%s\n' "${commands[@]}"
  exit 0
fi

cd "$(dirname "$0")/.."
pids=()
for ((i = 0; i < processes; i++)); do
  if [[ $i -eq 0 ]]; then
    XLA_FLAGS="--xla_force_host_platform_device_count=${devices}" "$python" -m fm.main "$@" \
      --coordinator_address="127.0.0.1:${port}" --num_processes="${processes}" --process_id=0 &
  else
    XLA_FLAGS="--xla_force_host_platform_device_count=${devices}" "$python" -m fm.main "$@" \
      --coordinator_address="127.0.0.1:${port}" --num_processes="${processes}" --process_id="${i}" \
      > "${log_dir}/fm-local-${port}-${i}.log" 2>&1 &
  fi
  pids+=($!)
done
status=0
for ((i = 0; i < processes; i++)); do
  if ! wait "${pids[$i]}"; then
    echo "error: process ${i} failed (log: ${log_dir}/fm-local-${port}-${i}.log for i > 0)" >&2
    status=1
  fi
done
exit $status
