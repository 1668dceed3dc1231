#!/usr/bin/env bash
# The whole GPU check in one go, under 8 minutes on one H100/H200: the GPU
# tests (tests/test_gpu.py, including the inductor-compiled CUDA-graph
# frames), the static-frame and Triton-kernel tests, then the speed table of
# benchmarks/gpu_speed.py (JSON, rewritten after every row, and a copy of the
# table under $OUT or the folder given as the first argument).
#
# The speed step gets what is left of CHECK_SECONDS (default 470) after the
# tests; its eventful-inductor runs (a compile of a 12-block frame each, about
# 1-2 minutes) come after every other run and start only while at least
# 100 s are left: the ones that do not fit are recorded as skipped (run
# `python benchmarks/gpu_speed.py --rows <row>` for them on their own).
#
#   bash benchmarks/gpu_check.sh [out_dir]
set -u -o pipefail
cd "$(dirname "$0")/.."
out_dir=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out_dir"
python=${PYTHON:-python3}
total=${CHECK_SECONDS:-470}
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || status=1
"$python" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

tests=(tests/test_gpu.py tests/test_static_frame.py)
[ -f tests/test_triton_kernels.py ] && tests+=(tests/test_triton_kernels.py)
echo "== tests: ${tests[*]}"
timeout 210 "$python" -m pytest "${tests[@]}" -q -p no:cacheprovider -m "not slow" \
    2>&1 | tail -40 || status=1

left=$((total - SECONDS))
((left < 150)) && left=150
echo "== speed (${left} s left)"
timeout "$left" "$python" benchmarks/gpu_speed.py --rounds 5 --profile 12 \
    --inductor-budget $((left - 100)) \
    --json "$out_dir/gpu_speed.json" 2>&1 | tee "$out_dir/gpu_speed.txt" || status=1
exit $status
