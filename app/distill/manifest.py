"""An ensemble folder's manifest.json as a typed record: the one place that reads and writes it.

Written by save_ensemble (export), completed at registration by optimize_for_serving (its `serving`
choice), read by whatever loads or serves the folder.
"""

import json
import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

FORMAT = "qadistill-ensemble/1"
MANIFEST_FILE = "manifest.json"


class EnsembleFormatError(ValueError):
    """A folder that is not a readable student ensemble; the message says what is wrong."""


class ServingChoice(BaseModel):
    """The CPU backend chosen at registration and what each candidate measured."""

    backend: str
    ms_per_question: float
    map_fp32: float
    map_backend: float
    max_map_drop: float
    eval_pairs: int
    candidates: list[dict[str, Any]]


class StandardFolder(BaseModel):
    """One member exported as a folder that other tools open as it is (see app/distill/standard.py)."""

    member: str = Field(description="The ensemble member it was made from, e.g. member-0.")
    path: str = Field(description="Its folder, relative to the ensemble folder.")
    format: Literal["cross-encoder", "sentence-transformer"]
    clamped_dims: int = Field(0, description="Sentence-transformer only: dimensions whose negative mean "
                                             "head weight was set to 0 (the folder then only approximates it).")


class EnsembleManifest(BaseModel):
    """What an ensemble folder holds: its members, heads, tokenisation and how it was made."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["qadistill-ensemble/1"] = FORMAT
    variant: str
    combine: Literal["mean"] = "mean"
    heads: list[str] = Field(min_length=1)
    members: list[str] = Field(min_length=1)
    max_length: int = Field(ge=8)
    spec: dict[str, Any]
    metrics: dict[str, Any]
    standard: list[StandardFolder] = Field(default_factory=list)
    serving: ServingChoice | None = None


def read_manifest(ensemble_dir: Path) -> EnsembleManifest:
    """The ensemble folder's manifest; EnsembleFormatError naming the field when it is not one."""
    path = Path(ensemble_dir) / MANIFEST_FILE
    if not path.is_file():
        raise EnsembleFormatError(f"{ensemble_dir}: no {MANIFEST_FILE}, not a student ensemble folder")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise EnsembleFormatError(f"{path}: not JSON: {err}") from err
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise EnsembleFormatError(f"{ensemble_dir}: format {found!r}, expected {FORMAT!r}")
    try:
        return EnsembleManifest.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise EnsembleFormatError(f"{path}: {problems}") from err


def write_manifest(ensemble_dir: Path, manifest: EnsembleManifest) -> None:
    """Write manifest.json atomically (strict JSON: NaN and infinities become null)."""
    path = Path(ensemble_dir) / MANIFEST_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(json_safe(manifest.model_dump(mode="json")), indent=2, allow_nan=False))
    os.replace(tmp, path)


def json_safe(value: Any) -> Any:
    """`value` with NaN and infinities replaced by None, so it is strict JSON (e.g. ROC-AUC of one class)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
