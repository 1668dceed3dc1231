#!/usr/bin/env bash
# The whole GPU check in one go (about 5 minutes on one H100): the GPU tests,
# the static-frame and Triton-kernel tests, then the speed table of
# benchmarks/gpu_speed.py (JSON and a copy of the table under $OUT or the
# folder given as the first argument).
#
#   bash benchmarks/gpu_check.sh [out_dir]
set -u -o pipefail
cd "$(dirname "$0")/.."
out_dir=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out_dir"
python=${PYTHON:-python3}
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || status=1
"$python" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

tests=(tests/test_gpu.py tests/test_static_frame.py)
[ -f tests/test_triton_kernels.py ] && tests+=(tests/test_triton_kernels.py)
echo "== tests: ${tests[*]}"
timeout 200 "$python" -m pytest "${tests[@]}" -q -p no:cacheprovider -m "not slow" \
    2>&1 | tail -40 || status=1

echo "== speed"
timeout 330 "$python" benchmarks/gpu_speed.py --rounds 5 --profile 12 \
    --json "$out_dir/gpu_speed.json" 2>&1 | tee "$out_dir/gpu_speed.txt" || status=1
exit $status
