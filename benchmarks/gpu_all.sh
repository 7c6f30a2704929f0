#!/bin/bash
# Every GPU benchmark in one go, each under its own time limit, for a short GPU lease:
#   bash benchmarks/gpu_all.sh [LOG_DIR] [STEP ...]   (logs: LOG_DIR/<step>.log, default /tmp/gpu_bench)
# STEP: gpu_pipeline model_memory extract_gpu fit_gpu (default: all, ~13 min at most, so over two
# calls where one call may run 10 min). A step that runs out of time is cut and the next one
# runs; the printed rc says which.
set -u
known=" gpu_pipeline model_memory extract_gpu fit_gpu "
log=/tmp/gpu_bench
if [[ $# -gt 0 && "$known" != *" $1 "* ]]; then
    log=$1
    shift
fi
for name in "$@"; do
    if [[ "$known" != *" $name "* ]]; then
        echo "gpu_all.sh: unknown step '$name'; steps:$known" >&2
        exit 2
    fi
done
steps=" $* "
mkdir -p "$log"
here=$(cd "$(dirname "$0")" && pwd)
export PYTHONUNBUFFERED=1 PYTHONPATH="$here/..:$here:${PYTHONPATH:-}"
step() {
    local limit=$1 name=$2
    shift 2
    [[ "$steps" == "  " || "$steps" == *" $name "* ]] || return 0
    echo "=== $name ($(date +%T), limit ${limit}s)"
    timeout "$limit" python3 "$here/$1" "${@:2}" 2>&1 | grep -v "RANDOM weights\|0/" | tee "$log/$name.log"
    echo "=== $name rc=${PIPESTATUS[0]} ($(date +%T))"
}
if ! python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_all.sh: no CUDA device here, nothing measured (run it on a GPU machine)."
    exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
step 300 gpu_pipeline gpu_pipeline.py --out "$log/pipeline"
step 180 model_memory model_memory.py --device cuda --threads 4
step 150 extract_gpu extract_gpu.py --size 16384 --seconds 5
step 150 fit_gpu fit_gpu.py --bags 600 --rounds 2
