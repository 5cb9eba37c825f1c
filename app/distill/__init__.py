"""The ML core: TMKD distillation of Q&A cross-encoders into student ensembles, as a plain Python call.

The names below are imported on first use, so `import app.distill.spec` (the API validating a spec) does
not pay for importing torch and transformers.
"""

import importlib
from typing import Any

_EXPORTS = {
    "Cancelled": "app.distill.hooks",
    "Hooks": "app.distill.hooks",
    "Progress": "app.distill.hooks",
    "PairScores": "app.distill.scoring",
    "StudentEnsemble": "app.distill.export",
    "load_ensemble": "app.distill.export",
    "PipelineResult": "app.distill.pipeline",
    "run_pipeline": "app.distill.pipeline",
    "PipelineSpec": "app.distill.spec",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'app.distill' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
