#!/bin/bash
# The checks that need a CUDA GPU, in one timed script: the pipeline and teacher unit tests on CUDA (bf16 autocast,
# pinned copies), the quality benchmark's gpu preset (seed 0, every variant), the serving benchmark on the GPU
# (fp16), then the preset's two more tmkd seeds while time is left. Each step's log goes to OUT as it finishes, so a
# run cut short keeps what it did. Needs the bench extras and the data (QADISTILL_SHARED_DATA, default ../shared/data).
#
#     OUT=/tmp/gpu BUDGET=600 bash benchmarks/gpu_checks.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/.cache/gpu-checks}
BUDGET=${BUDGET:-900}
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

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.__version__, \
torch.cuda.get_device_name())" 2>&1 | tee -a "$OUT/steps.log" || exit 1

step "unit tests on CUDA, beside the benchmark (niced)"
(QADISTILL_TEST_DEVICE=cuda timeout 300 nice -n 10 "$PY" -m pytest -q -p no:cacheprovider tests/unit/test_pipeline.py \
  tests/unit/test_teachers.py >"$OUT/pytest-cuda.log" 2>&1
  echo "rc $?" >>"$OUT/pytest-cuda.log") &

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
wait
step "done"
