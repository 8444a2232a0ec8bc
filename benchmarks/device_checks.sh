#!/usr/bin/env bash
# GPU checks in one run, for a session that is lent a GPU machine: build the CUDA kernels, run
# the CUDA tests, then the prior-interaction and sliding-window benchmarks on the GPU (the
# tables issues 3 and 4 ask for). Writes at most 8 files under $OUT (default ./device_out):
#   env.txt (GPU, torch, hermes capabilities), build.log, cuda_tests.log,
#   prior_interaction_cuda.{json,md}, sliding_window_cuda.json, sliding_window.log
#
# The GPU image has PyTorch, SciPy, pytest, CMake, pybind11 and scikit-build-core but not MONAI,
# nibabel, pynrrd or pydicom: carry their wheels in .whl/ (ignored by git), fetched here with
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl \
#     monai==1.6.1 nibabel==5.4.2 pynrrd==1.1.3 pydicom==3.0.2 importlib-resources==7.1.0
# and run:  bash benchmarks/device_checks.sh   (about 4-6 minutes on an H100).
# STEP_TIMEOUT (seconds, default 180) bounds each benchmark.
set -u
OUT=${OUT:-device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STEP_TIMEOUT=${STEP_TIMEOUT:-180}

if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} > "$OUT/env.txt"

# Build for the card in the machine only (Hopper: 90), in place.
arch=$(python3 -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')" \
  2> /dev/null || echo 90)
if ! HERMES_CUDA=on HERMES_CUDA_ARCHS="$arch" timeout 400 python3 -m pip install -q --no-deps \
    --no-build-isolation -e . > "$OUT/build.log" 2>&1; then
  echo "build failed"; tail -40 "$OUT/build.log"; exit 1
fi
python3 -c "import hermes.ops as o; print(o.capabilities())" >> "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# The prior-attention tests need no MONAI wheels and go first, with synchronous launches so
# that a fault names its kernel; then every other CUDA test (a test module whose imports are
# missing is reported, not fatal).
CUDA_LAUNCH_BLOCKING=1 timeout 150 python3 -m pytest -q -m cuda -p no:cacheprovider \
  tests/test_prior_attention_fused.py > "$OUT/cuda_tests.log" 2>&1
echo "CUDA prior-attention tests: exit $?"; tail -3 "$OUT/cuda_tests.log"
timeout 240 python3 -m pytest -q -m cuda -p no:cacheprovider --continue-on-collection-errors \
  --deselect tests/test_prior_attention_fused.py tests >> "$OUT/cuda_tests.log" 2>&1
echo "other CUDA tests: exit $?"; tail -3 "$OUT/cuda_tests.log"

timeout "$STEP_TIMEOUT" python3 benchmarks/bench_prior_interaction.py --device cuda \
  --out "$OUT/prior_interaction_cuda"
echo "prior interaction: exit $?"

timeout "$STEP_TIMEOUT" python3 benchmarks/bench_sliding_window.py --device cuda \
  --out "$OUT/sliding_window_cuda.json" > "$OUT/sliding_window.log" 2>&1
echo "sliding window: exit $?"; tail -30 "$OUT/sliding_window.log"
