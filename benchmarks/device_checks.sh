#!/usr/bin/env bash
# GPU checks in one run, for a session that is lent a GPU machine: build the CUDA kernels, run
# the CUDA tests, then the benchmarks on the GPU (the tables issues 3 and 4 ask for, and
# hermes.segment end to end with the fused prior attention checked against the reference), a
# short training + evaluate + segment run on the GPU, and a compute-sanitizer pass over small
# fused calls. Steps share a time budget (BUDGET seconds,
# default 450): each gets at most what is left, so the run ends within it; later steps are
# skipped when too little is left; SKIP (names, space-separated) leaves steps out, e.g.
# SKIP="sliding_window sanitizer". Writes at most 8 files under $OUT (default ./device_out):
#   env.txt (GPU, torch, hermes capabilities, each step's exit status and seconds), build.log,
#   cuda_tests.log (tests, then the sanitizer), bench.log (every benchmark's output and tables),
#   prior_interaction_cuda.json, prior_interaction_cuda_bfloat16.json, sliding_window_cuda.json,
#   segment_cuda.json
#
# The GPU image has PyTorch, SciPy, pytest, CMake, pybind11 and scikit-build-core but not MONAI,
# nibabel, pynrrd or pydicom: carry their wheels in .whl/ (ignored by git), fetched here with
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl \
#     monai==1.6.1 nibabel==5.4.2 pynrrd==1.1.3 pydicom==3.0.2 importlib-resources==7.1.0
# and run:  bash benchmarks/device_checks.sh   (4-5 minutes on an H200).
set -u
OUT=${OUT:-device_out}
BUDGET=${BUDGET:-450}
mkdir -p "$OUT"
TMP=$(mktemp -d)
export PYTHONUNBUFFERED=1
START=$SECONDS

# run NAME CAP CMD...: CMD under a timeout of min(CAP, what is left of the budget - 5 s);
# skipped when named in SKIP or under 15 s are left. Records the exit status and seconds in
# env.txt.
run() {
  local name=$1 cap=$2 left t0 rc
  shift 2
  if [[ " ${SKIP:-} " == *" $name "* ]]; then
    echo "step $name: skipped (SKIP)" | tee -a "$OUT/env.txt"
    return 0
  fi
  left=$((BUDGET - (SECONDS - START) - 5))
  if ((left < 15)); then
    echo "step $name: skipped (budget spent)" | tee -a "$OUT/env.txt"
    return 1
  fi
  ((cap > left)) && cap=$left
  t0=$SECONDS
  timeout "$cap" "$@"
  rc=$?
  echo "step $name: exit $rc in $((SECONDS - t0)) s (limit $cap s)" | tee -a "$OUT/env.txt"
  return $rc
}

if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  nvcc --version | tail -2
  nproc
} > "$OUT/env.txt"

# Build for the card in the machine only (Hopper: 90), in place.
arch=$(python3 -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')" \
  2> /dev/null || echo 90)
if ! HERMES_CUDA=on HERMES_CUDA_ARCHS="$arch" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    run build 240 python3 -m pip install -q --no-deps --no-build-isolation -e . \
    > "$OUT/build.log" 2>&1; then
  echo "build failed"; tail -40 "$OUT/build.log"; cat "$OUT/env.txt"; exit 1
fi
python3 -c "import hermes.ops as o; print(o.capabilities())" >> "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# The prior-attention tests first, with synchronous launches so that a fault names its kernel;
# then every other CUDA test (a module whose imports are missing is reported, not fatal).
CUDA_LAUNCH_BLOCKING=1 run tests_prior 120 python3 -m pytest -q -m cuda -p no:cacheprovider \
  -rfE tests/test_prior_attention_fused.py > "$OUT/cuda_tests.log" 2>&1
tail -3 "$OUT/cuda_tests.log"
run tests_other 120 python3 -m pytest -q -m cuda -p no:cacheprovider -rfE \
  --continue-on-collection-errors --deselect tests/test_prior_attention_fused.py tests \
  >> "$OUT/cuda_tests.log" 2>&1
tail -3 "$OUT/cuda_tests.log"

B="$OUT/bench.log"
run prior_fp32 100 python3 benchmarks/bench_prior_interaction.py --device cuda \
  --out "$TMP/prior_interaction_cuda" >> "$B" 2>&1
cp "$TMP/prior_interaction_cuda.json" "$OUT/" 2> /dev/null
run sliding_window 120 python3 benchmarks/bench_sliding_window.py --device cuda \
  --out "$OUT/sliding_window_cuda.json" >> "$B" 2>&1
run segment 120 python3 benchmarks/bench_segment.py --device cuda --inputs chest_ct \
  --threads "$(nproc)" >> "$B" 2>&1
cp benchmarks/results/segment_cuda_chest_ct.json "$OUT/segment_cuda.json" 2> /dev/null
# Training on the GPU end to end (bf16 autocast, the GPU formulations with gradients, a few
# steps on a small synthetic collection), then evaluate and segment with the trained model.
cat > "$TMP/train_smoke.sh" << 'EOF'
set -e
cd "$1"
python3 -m hermes.cli data synthetic synth --cases 3 --datasets synth_ct synth_t1
python3 -m hermes.cli train synth/collection.yaml --out run --steps 20 --crop 64 --batch-size 2 \
  --device cuda --amp bf16 --quiet
python3 -m hermes.cli evaluate run/model.hermes synth/collection.yaml --split val \
  --device cuda --out eval.csv
python3 -m hermes.cli segment -i synth/synth_ct/imagesTr/synth_ct_000.nii.gz -o seg \
  --model run/model.hermes --modality CT --device cuda
EOF
run train_smoke 150 bash "$TMP/train_smoke.sh" "$TMP" >> "$B" 2>&1
run prior_bf16 60 python3 benchmarks/bench_prior_interaction.py --device cuda --dtype bfloat16 \
  --no-memory --out "$TMP/prior_interaction_cuda_bfloat16" >> "$B" 2>&1
cp "$TMP/prior_interaction_cuda_bfloat16.json" "$OUT/" 2> /dev/null
tail -60 "$B"

# Out-of-bounds accesses and races in the kernels: small calls of the fused kernels (forward
# and backward, float32 and bfloat16, odd sizes) and the aggregation (streamed labels,
# probabilities).
cat > "$TMP/sanitize.py" << 'EOF'
import sys

import torch

sys.path.insert(0, "benchmarks")
from bench_prior_interaction import make_inputs  # noqa: E402

from hermes.inference import sliding_window_inference  # noqa: E402
from hermes.ops.prior_attention_fused import prior_attention_block_fused  # noqa: E402

for dtype in (torch.float32, torch.bfloat16):
    for c, length, n in ((64, 37, 1), (96, 300, 5)):
        f, pr, p = make_inputs(c, length, n, "cuda", dtype)
        with torch.no_grad():
            prior_attention_block_fused(f, pr, p, fold="always")
        out_f, out_p = prior_attention_block_fused(f, pr, p, fold="always")
        (out_f.sum() + out_p.sum()).backward()
x = torch.randn(1, 1, 37, 29, 23, device="cuda")
for output in ("labels", "probs", "masks"):
    for streaming in (False, True):
        sliding_window_inference(x, (16, 16, 16), 2, lambda w: w.repeat(1, 3, 1, 1, 1),
                                 overlap=0.5, mode="gaussian", output=output,
                                 streaming=streaming)
torch.cuda.synchronize()
print("sanitized calls done")
EOF
run sanitizer 90 compute-sanitizer --tool memcheck --error-exitcode 9 python3 "$TMP/sanitize.py" \
  >> "$OUT/cuda_tests.log" 2>&1
tail -5 "$OUT/cuda_tests.log"
echo "total $((SECONDS - START)) s"
