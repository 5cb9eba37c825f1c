"""Student ensembles on disk: save, load and score.

Layout of an ensemble folder (a model version's artifact):
    manifest.json   {"format": "qadistill-ensemble/1", "variant", "combine": "mean", "heads", "members",
                     "max_length", "spec", "metrics"}
    member-<i>/     student.json {kind, heads, max_length, dropout[, bilstm sizes]}, heads.safetensors,
                    model.safetensors (+ config.json for a transformer: the encoder opens with
                    transformers.AutoModel), tokenizer files
Only safetensors and JSON are read back: loading never unpickles anything.
"""

import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoModel, AutoTokenizer
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from app.distill.students import BiEncoderStudent, BiLSTMEncoder, MultiHeadStudent

FORMAT = "qadistill-ensemble/1"
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class EnsembleFormatError(ValueError):
    """A folder that is not a readable student ensemble; the message says what is wrong."""


@dataclass
class EnsembleScores:
    """P(relevant) per pair: combined [N], per member [N, K], per member and head [N, K, H]."""

    scores: np.ndarray
    member_scores: np.ndarray
    head_scores: np.ndarray


class StudentEnsemble:
    """Students whose heads' and members' P(relevant) are averaged; the thing a served model version is."""

    def __init__(
        self,
        members: Sequence[nn.Module],
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_length: int,
        heads: Sequence[str],
        manifest: dict[str, Any],
        device: str = "cpu",
    ) -> None:
        self.members = [m.to(device).eval() for m in members]
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.heads = list(heads)
        self.manifest = manifest
        self.device = torch.device(device)

    def encode(self, questions: list[str], passages: list[str]) -> dict[str, Tensor]:
        """Tokenise (question, passage) pairs into one padded batch, cutting passages to max_length."""
        return self._tokenize(questions, passages, padding=True, return_tensors="pt")

    def tokenize(self, questions: list[str], passages: list[str]) -> dict[str, list[list[int]]]:
        """Each pair's model inputs as `encode` makes them, unpadded: for batches padded chunk by chunk."""
        return self._tokenize(questions, passages, padding=False, return_tensors=None)

    def score_batch(self, batch: dict[str, Tensor]) -> EnsembleScores:
        """Scores of one encoded batch; every member runs under inference mode."""
        batch = {k: v.to(self.device) for k, v in batch.items() if k in _MODEL_INPUTS}
        with torch.inference_mode():
            logits = torch.stack([member(**batch).float() for member in self.members], dim=1)  # [N, K, H, 2]
            head_scores = torch.softmax(logits, dim=-1)[..., 1].cpu().numpy()
        member_scores = head_scores.mean(axis=2)
        return EnsembleScores(scores=member_scores.mean(axis=1), member_scores=member_scores, head_scores=head_scores)

    def score_pairs(self, questions: list[str], passages: list[str]) -> EnsembleScores:
        """Scores of (question, passage) pairs in one batch."""
        if len(questions) != len(passages):
            raise ValueError(f"{len(questions)} questions but {len(passages)} passages")
        return self.score_batch(self.encode(questions, passages))

    def _tokenize(self, questions: list[str], passages: list[str], **options: Any) -> dict[str, Any]:
        try:
            encoded = self.tokenizer(
                questions, passages, truncation="only_second", max_length=self.max_length, **options
            )
        except Exception:  # the tokenizers library raises a bare Exception when a question alone is too long
            encoded = self.tokenizer(
                questions, passages, truncation="longest_first", max_length=self.max_length, **options
            )
        return {k: v for k, v in encoded.items() if k in _MODEL_INPUTS}


def save_ensemble(
    members: Sequence[MultiHeadStudent],
    tokenizer: PreTrainedTokenizerBase,
    out: Path,
    *,
    variant: str,
    heads: Sequence[str],
    spec: BaseModel | dict[str, Any],
    metrics: dict[str, Any],
) -> Path:
    """Write the ensemble folder `out` (replacing an earlier one as a whole) and return it.

    max_length comes from spec.student.max_length.
    """
    spec_dict = spec.model_dump(mode="json") if isinstance(spec, BaseModel) else dict(spec)
    max_length = int(spec_dict["student"]["max_length"])
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    names = [f"member-{i}" for i in range(len(members))]
    for name, member in zip(names, members, strict=True):
        save_member(member, tokenizer, tmp / name, max_length=max_length)
    manifest = {
        "format": FORMAT,
        "variant": variant,
        "combine": "mean",
        "heads": list(heads),
        "members": names,
        "max_length": max_length,
        "spec": spec_dict,
        "metrics": metrics,
    }
    (tmp / "manifest.json").write_text(json.dumps(json_safe(manifest), indent=2, allow_nan=False))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def read_manifest(ensemble_dir: Path) -> dict:
    """The ensemble folder's manifest.json; EnsembleFormatError when the folder is not an ensemble."""
    path = Path(ensemble_dir) / "manifest.json"
    if not path.is_file():
        raise EnsembleFormatError(f"{ensemble_dir}: no manifest.json, not a student ensemble folder")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise EnsembleFormatError(f"{ensemble_dir}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def load_ensemble(path: Path, *, device: str = "cpu") -> StudentEnsemble:
    """Open an ensemble folder written by save_ensemble; EnsembleFormatError when it is not one."""
    path = Path(path)
    manifest = read_manifest(path)
    members = [load_member(path / name) for name in manifest["members"]]
    tokenizer = AutoTokenizer.from_pretrained(path / manifest["members"][0])
    return StudentEnsemble(
        members,
        tokenizer,
        max_length=manifest["max_length"],
        heads=manifest["heads"],
        manifest=manifest,
        device=device,
    )


def save_member(
    student: MultiHeadStudent | BiEncoderStudent, tokenizer: PreTrainedTokenizerBase, folder: Path, *, max_length: int
) -> None:
    """Write one student: encoder, heads, its own student.json and the tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "kind": student.kind,
        "heads": student.head_names,
        "max_length": max_length,
        "dropout": student.dropout.p,
    }
    if isinstance(student, BiEncoderStudent):
        config["cls_token_id"] = student.cls_token_id
    if student.kind in ("transformer", "bi-encoder"):
        student.encoder.save_pretrained(folder, safe_serialization=True)
    else:
        config["bilstm"] = student.encoder.config
        save_file(_contiguous(student.encoder.state_dict()), str(folder / "model.safetensors"))
    save_file(_contiguous(student.heads.state_dict()), str(folder / "heads.safetensors"))
    (folder / "student.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(folder)


def load_member(folder: Path) -> MultiHeadStudent | BiEncoderStudent:
    """Read one student written by save_member, in eval mode on the CPU."""
    config_file = folder / "student.json"
    if not config_file.is_file():
        raise EnsembleFormatError(f"{folder}: no student.json")
    config = json.loads(config_file.read_text())
    if config["kind"] in ("transformer", "bi-encoder"):
        try:
            encoder = AutoModel.from_pretrained(folder, add_pooling_layer=False, use_safetensors=True)
        except TypeError:  # architectures without a pooler option
            encoder = AutoModel.from_pretrained(folder, use_safetensors=True)
        hidden = encoder.config.hidden_size
    elif config["kind"] == "bilstm":
        encoder = BiLSTMEncoder(**config["bilstm"])
        encoder.load_state_dict(load_file(folder / "model.safetensors"))
        hidden = encoder.output_size
    else:
        raise EnsembleFormatError(f"{folder}: unknown student kind {config['kind']!r}")
    if config["kind"] == "bi-encoder":
        student = BiEncoderStudent(encoder, heads=config["heads"], cls_token_id=config["cls_token_id"])
        student.heads.load_state_dict(load_file(folder / "heads.safetensors"))
        return student.eval()
    student = MultiHeadStudent(encoder, kind=config["kind"], hidden_size=hidden, heads=config["heads"])
    student.dropout.p = config["dropout"]
    student.heads.load_state_dict(load_file(folder / "heads.safetensors"))
    return student.eval()


def json_safe(value: Any) -> Any:
    """`value` with NaN and infinities replaced by None, so it is strict JSON (e.g. ROC-AUC of one class)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _contiguous(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}
