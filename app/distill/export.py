"""Student ensembles on disk: save, load and score.

Layout of an ensemble folder (a model version's artifact):
    manifest.json   the EnsembleManifest (app/distill/manifest.py): variant, heads, members, max_length,
                    spec, metrics, standard folders and, once registered, the serving choice
    member-<i>/     student.json {kind, heads, max_length, dropout[, bilstm sizes]}, heads.safetensors,
                    model.safetensors (+ config.json for a transformer: the encoder opens with
                    transformers.AutoModel), tokenizer files
    standard/member-<i>/  the member as a folder other tools open (app/distill/standard.py)
Only safetensors and JSON are read back: loading never unpickles anything.
"""

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoModel, AutoTokenizer
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from app.distill.manifest import EnsembleFormatError, EnsembleManifest, read_manifest, write_manifest
from app.distill.scoring import PairEncoder, PairScores, combine_logits, score_encoded, torch_member
from app.distill.standard import STANDARD_DIR, write_standard_folder
from app.distill.students import BiEncoderStudent, BiLSTMEncoder, MultiHeadStudent

_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class StudentEnsemble:
    """Students whose heads' and members' P(relevant) are averaged; the thing a served model version is."""

    def __init__(
        self,
        members: Sequence[nn.Module],
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_length: int,
        heads: Sequence[str],
        device: str = "cpu",
    ) -> None:
        self.members = [m.to(device).eval() for m in members]
        self.encoder = PairEncoder(tokenizer, max_length)
        self.heads = list(heads)
        self.device = torch.device(device)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The members' tokenizer."""
        return self.encoder.tokenizer

    def encode(self, questions: list[str], passages: list[str]) -> dict[str, Tensor]:
        """(question, passage) pairs as one padded batch, each pair tokenised on its own."""
        encoded = self.encoder(questions, passages)
        return encoded.collate(range(len(encoded)))

    def score_batch(self, batch: dict[str, Tensor]) -> PairScores:
        """Scores of one encoded batch; every member runs under inference mode."""
        batch = {k: v.to(self.device) for k, v in batch.items() if k in _MODEL_INPUTS}
        with torch.inference_mode():
            logits = [member(**batch).float().cpu().numpy() for member in self.members]
        return combine_logits(logits)

    def score_pairs(self, questions: list[str], passages: list[str]) -> PairScores:
        """Scores of (question, passage) pairs as serving scores them: length-sorted chunks, and a bi-encoder
        member's questions and passages encoded apart, each distinct side once."""
        members = [torch_member(member, self.device) for member in self.members]
        return score_encoded(self.encoder(questions, passages), members)


def save_ensemble(
    members: Sequence[MultiHeadStudent | BiEncoderStudent],
    tokenizer: PreTrainedTokenizerBase,
    out: Path,
    *,
    variant: str,
    heads: Sequence[str],
    spec: BaseModel | dict[str, Any],
    metrics: dict[str, Any],
) -> Path:
    """Write the ensemble folder `out` (replacing an earlier one as a whole) and return it.

    max_length comes from spec.student.max_length. Each member is also written as a standard folder
    (a cross-encoder or a sentence-transformer) where its kind has one.
    """
    spec_dict = spec.model_dump(mode="json") if isinstance(spec, BaseModel) else dict(spec)
    max_length = int(spec_dict["student"]["max_length"])
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    names = [f"member-{i}" for i in range(len(members))]
    standard = []
    for name, member in zip(names, members, strict=True):
        save_member(member, tokenizer, tmp / name, max_length=max_length)
        folder = write_standard_folder(member, tokenizer, tmp / STANDARD_DIR / name, max_length=max_length)
        if folder is not None:
            standard.append(folder.model_copy(update={"member": name, "path": f"{STANDARD_DIR}/{name}"}))
    manifest = EnsembleManifest(
        variant=variant,
        heads=list(heads),
        members=names,
        max_length=max_length,
        spec=spec_dict,
        metrics=metrics,
        standard=standard,
    )
    write_manifest(tmp, manifest)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def load_ensemble(path: Path, *, device: str = "cpu") -> StudentEnsemble:
    """Open an ensemble folder written by save_ensemble; EnsembleFormatError when it is not one."""
    path = Path(path)
    manifest = read_manifest(path)
    members = [load_member(path / name) for name in manifest.members]
    tokenizer = AutoTokenizer.from_pretrained(path / manifest.members[0])
    return StudentEnsemble(members, tokenizer, max_length=manifest.max_length, heads=manifest.heads, device=device)


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


def read_cosine_heads(folder: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """A bi-encoder member's head weights [H, D], biases [H] (float32) and [CLS] id, without its encoder."""
    config = json.loads((folder / "student.json").read_text())
    if config.get("kind") != "bi-encoder":
        raise EnsembleFormatError(f"{folder}: a {config.get('kind')!r} member has no cosine heads")
    heads = load_numpy(folder / "heads.safetensors")
    return heads["weight"].astype(np.float32), heads["bias"].astype(np.float32), int(config["cls_token_id"])


def _contiguous(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}
