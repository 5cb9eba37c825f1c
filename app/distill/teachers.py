"""Teachers: bi-encoders (app.distill.biencoder) fine-tuned with a ranking loss or used zero-shot,
cross-encoders (`AutoModelForSequenceClassification`, 2 labels) fine-tuned with cross-entropy, or
ready-made folders given by the user. A trained teacher is saved as a Hugging Face folder (safetensors
weights and tokenizer) under out_dir/teachers/<name>; a zero-shot one is its base checkpoint's folder.
"""

import functools
import hashlib
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from app.distill.biencoder import BiEncoder, embed_pairs, in_batch_ranking_loss, load_bi_encoder
from app.distill.data import Pair, encode_pairs, encode_separately, group_by_question
from app.distill.devices import Device
from app.distill.hooks import Hooks, Progress
from app.distill.losses import hard_loss
from app.distill.pretrained import resolve_model
from app.distill.spec import TeacherSpec
from app.distill.train import TrainConfig, mix_weights, pairs_read, train

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def prepare_teacher(
    spec: TeacherSpec,
    *,
    train_pairs: Sequence[Pair],
    out_dir: Path,
    cache_dir: Path | None,
    device: Device,
    hooks: Hooks,
    checkpoint_every: int,
    teacher_dirs: Mapping[str, Path] | None = None,
    anchor: Callable[[list[int] | None], Mapping[str, Tensor]] | None = None,
) -> Path:
    """The teacher's model folder: `spec.path` when ready-made, else fine-tuned (or, for a soup, averaged
    from the folders of `teacher_dirs` it names) into out_dir/teachers/<name>.

    A teacher already saved there by an earlier run is reused; an interrupted training resumes. `anchor(rows)`: the
    base's unit embeddings (`question_embedding`, `passage_embedding`) of the training pairs at `rows` (None: all)
    for a teacher with an embedding_weight, from the caller when it has them cached (teachers of one base share
    them), else computed here.
    """
    stage = f"teacher:{spec.name}"
    if spec.path is not None:
        folder = resolve_model(spec.path, cache_dir=cache_dir)
        hooks.event(stage, f"ready-made teacher at {folder}")
        hooks.progress(Progress(stage, 1, 1))
        return folder
    if spec.zero_shot:
        folder = resolve_model(spec.base, cache_dir=cache_dir)
        hooks.event(stage, f"{spec.base} used zero-shot as a bi-encoder")
        hooks.progress(Progress(stage, 1, 1))
        return folder
    folder = out_dir / "teachers" / spec.name
    if (folder / "config.json").is_file():
        hooks.event(stage, f"already trained: {folder}")
        hooks.progress(Progress(stage, 1, 1))
        return folder

    base = resolve_model(spec.base, cache_dir=cache_dir)
    if spec.average_of is not None:
        members = [(teacher_dirs or {})[name] for name in spec.average_of]
        save_teacher(_soup(members, base, spec.keep_base), AutoTokenizer.from_pretrained(members[0]), folder)
        hooks.event(stage, f"weights averaged over {', '.join(spec.average_of)}, {spec.keep_base:g} of {spec.base}'s")
        hooks.progress(Progress(stage, 1, 1))
        return folder
    hooks.event(stage, f"fine-tuning {spec.base} as a {spec.kind} on {len(train_pairs)} labelled pairs")
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(spec.seed)  # the new classifier head's initialisation
    labels = torch.tensor([p.label for p in train_pairs], dtype=torch.long)
    groups = None
    config = TrainConfig(
        learning_rate=spec.learning_rate,
        batch_size=spec.batch_size,
        epochs=spec.epochs,
        seed=spec.seed,
        max_steps=spec.max_steps,
        checkpoint_every=checkpoint_every,
    )
    # float32 master weights whatever the checkpoint holds: AdamW on half-precision weights loses updates.
    if spec.kind == "bi-encoder":
        model: nn.Module = BiEncoder(AutoModel.from_pretrained(base, use_safetensors=True, dtype=torch.float32))
        encodings = encode_separately(train_pairs, tokenizer, spec.max_length)
        groups = group_by_question(train_pairs)
        question_of = torch.empty(len(train_pairs), dtype=torch.long)
        for q, members in enumerate(groups):
            question_of[members] = q
        targets = {"labels": labels, "group": question_of}
        loss_fn = in_batch_ranking_loss
        if spec.embedding_weight:
            rows = anchor_rows(config, groups, len(train_pairs))
            if anchor is not None:
                base_embeddings = anchor(rows)
            else:
                # The model holds the base's weights still: its embeddings now are the ones to keep.
                hooks.event(stage, "embedding the training texts with the base checkpoint for the teacher to keep")
                questions, passages = embed_pairs(
                    model.to(device.torch_device),
                    tokenizer,
                    train_pairs if rows is None else [train_pairs[i] for i in rows],
                    max_length=spec.max_length,
                    device=device,
                    hooks=hooks,
                )
                base_embeddings = {"question_embedding": questions, "passage_embedding": passages}
            for key in ("question_embedding", "passage_embedding"):
                targets[key] = _spread(base_embeddings[key], rows, len(train_pairs))
            loss_fn = functools.partial(in_batch_ranking_loss, embedding_weight=spec.embedding_weight)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=2, use_safetensors=True, dtype=torch.float32
        )
        encodings = encode_pairs(train_pairs, tokenizer, spec.max_length)
        targets = {"labels": labels}
        loss_fn = classification_loss
    checkpoint_dir = out_dir / "checkpoints" / "teacher" / spec.name
    train(
        model,
        stage=stage,
        encodings=encodings,
        targets=targets,
        loss_fn=loss_fn,
        config=config,
        checkpoint_dir=checkpoint_dir,
        device=device,
        hooks=hooks,
        groups=groups,
    )
    trained = model.encoder if isinstance(model, BiEncoder) else model
    if spec.keep_base > 0:
        # The encoder body only: a cross-encoder's fresh classifier has no base to go back to.
        mix_weights(trained.base_model, _encoder(base).state_dict(), spec.keep_base)
        hooks.event(stage, f"weights averaged: {spec.keep_base:g} of {spec.base}'s, the rest fine-tuned")
    save_teacher(trained, tokenizer, folder)
    # The saved folder is the artifact now; its checkpoints (weights and optimiser state, ~3x the model) go.
    shutil.rmtree(checkpoint_dir)
    hooks.event(stage, f"saved to {folder}")
    return folder


def anchor_rows(config: TrainConfig, groups: list[list[int]], num_pairs: int) -> list[int] | None:
    """The training pairs whose base embeddings a teacher must keep: those its stage reads when that is under half
    of them, else None (all of them).

    A teacher shorter than an epoch reads a part (the cpu preset's mpnet, a quarter epoch: its base's pass over all
    9,189 texts took 5.4 minutes for 17 steps); a teacher that reads most pairs embeds them all, a set cached once for
    every teacher of its base.
    """
    read = pairs_read(config, groups, num_pairs)
    return read if 2 * len(read) < num_pairs else None


def _spread(vectors: Tensor, rows: list[int] | None, num_pairs: int) -> Tensor:
    """[num_pairs, D] with `vectors` at `rows` (all rows when None) and zeros where no batch reads."""
    if rows is None:
        return vectors
    full = vectors.new_zeros(num_pairs, vectors.shape[1])
    full[torch.tensor(rows)] = vectors
    return full


def _encoder(folder: Path) -> PreTrainedModel:
    return AutoModel.from_pretrained(folder, use_safetensors=True, dtype=torch.float32)


def _soup(members: Sequence[Path], base: Path, keep_base: float) -> PreTrainedModel:
    """The mean of the member encoders' weights (a model soup, Wortsman et al. 2022), then keep_base of the
    base's mixed in (WiSE-FT)."""
    soup, *others = [_encoder(folder) for folder in members]
    states = [other.state_dict() for other in others]
    base_state = _encoder(base).state_dict() if keep_base > 0 else None
    shapes = _shapes(soup.state_dict())
    for folder, state in zip([*members[1:], base], [*states, base_state], strict=True):
        if state is not None and _shapes(state) != shapes:
            raise ValueError(f"average_of: {folder} and {members[0]} are not the same architecture")
    with torch.no_grad():
        for name, tensor in soup.state_dict().items():
            if tensor.is_floating_point():
                tensor.add_(sum(state[name] for state in states)).div_(len(members))
    if base_state is not None:
        mix_weights(soup, base_state, keep_base)
    return soup


def _shapes(state: dict[str, Tensor]) -> dict[str, torch.Size]:
    return {name: tensor.shape for name, tensor in state.items()}


def classification_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Cross-entropy of a sequence classifier against the batch's hard labels."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return hard_loss(model(**inputs).logits.float(), batch["labels"])


def save_teacher(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Write the teacher as a Hugging Face folder (safetensors), replacing any earlier one atomically."""
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def load_teacher(
    folder: Path, device: Device, kind: str = "cross-encoder"
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A teacher of `kind` ready for inference on `device`, and its tokenizer."""
    if kind == "bi-encoder":
        return load_bi_encoder(folder, device)
    model = AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=True, dtype=torch.float32)
    model.to(device.torch_device).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def teacher_fingerprint(folder: Path) -> str:
    """SHA-256 over the teacher's weight files and config: equal fingerprints give equal logits."""
    digest = hashlib.sha256()
    files = sorted(f for f in folder.iterdir() if f.suffix in WEIGHT_SUFFIXES or f.name == "config.json")
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
