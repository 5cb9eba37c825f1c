"""What the teachers say of every pair, computed once and cached: soft labels and reference embeddings.

Cache layout: cache_dir/soft-labels/<teacher fingerprint>/<data sha256>-len<max_length>.safetensors, holding
a cross-encoder's `logits` [N, 2] float32; and cache_dir/embeddings/<fingerprint>/<data sha256>-len<max_length>
.safetensors, holding a bi-encoder's unit `vectors` [T, D] of the data's distinct texts and each pair's rows in
it (`question_index`, `passage_index`, [N]). A bi-encoder's soft labels are its scaled cosines of those vectors:
a student's reference embeddings and the soft labels of the teacher it was cut from are one pass. The
fingerprint hashes the teacher's weights and the data hash the file's bytes, so stages, variants, resumed and
later runs on the same teacher and data reuse one file. On the CPU a bi-encoder's pass runs on ONNX Runtime
(app/distill/onnx_runtime.py), on a GPU in torch.
"""

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from app.distill.biencoder import TextEncoder, cosine_logits, embed_texts, load_bi_encoder, text_index
from app.distill.data import EncodedPairs, Pair, encode_pairs, iter_batches
from app.distill.devices import Device
from app.distill.hooks import Cancelled, Hooks
from app.distill.onnx_runtime import OnnxTextEncoder, onnx_text_encoder
from app.distill.teachers import load_teacher, teacher_fingerprint

log = logging.getLogger(__name__)

INFERENCE_BATCH = 64


def soft_labels_path(cache_dir: Path, fingerprint: str, data_sha256: str, max_length: int) -> Path:
    """Where a cross-encoder teacher's logits on one data set are cached."""
    return cache_dir / "soft-labels" / fingerprint / f"{data_sha256}-len{max_length}.safetensors"


def teacher_soft_labels(
    teacher_dir: Path,
    datasets: dict[str, tuple[Sequence[Pair], str]],
    *,
    max_length: int,
    cache_dir: Path,
    device: Device,
    hooks: Hooks,
    on_batch: Callable[[], None] | None = None,
    kind: str = "cross-encoder",
) -> dict[str, Tensor]:
    """One teacher's logits [N, 2] on each named data set (pairs, data sha256), from the cache or computed.

    The teacher is loaded only when some data set is not cached yet; on_batch is called per computed batch.
    A bi-encoder's logits are [0, scale * cosine] of its cached embeddings (`reference_embeddings`).
    """
    if kind == "bi-encoder":
        embedded = reference_embeddings(
            teacher_dir,
            datasets,
            max_length=max_length,
            cache_dir=cache_dir,
            device=device,
            hooks=hooks,
            on_batch=on_batch,
        )
        return {name: cosine_logits(e["question_embedding"], e["passage_embedding"]) for name, e in embedded.items()}
    fingerprint = teacher_fingerprint(teacher_dir)
    stage = "soft_labels"
    found: dict[str, Tensor] = {}
    model = tokenizer = None
    for name, (pairs, data_sha) in datasets.items():
        path = soft_labels_path(cache_dir, fingerprint, data_sha, max_length)
        cached = _read_cached(path, len(pairs))
        if cached is not None:
            hooks.event(stage, f"{teacher_dir.name} on {name}: reused cached soft labels {path}")
            found[name] = cached
            continue
        if model is None:
            model, tokenizer = load_teacher(teacher_dir, device, kind)
        logits = predict_logits(
            model, encode_pairs(pairs, tokenizer, max_length), device=device, hooks=hooks, on_batch=on_batch
        )
        _write_atomically(path, {"logits": logits}, teacher=fingerprint, data=data_sha, max_length=max_length)
        hooks.event(stage, f"{teacher_dir.name} on {name}: computed {len(pairs)} soft labels into {path}")
        found[name] = logits
    return found


def reference_embeddings(
    folder: Path,
    datasets: dict[str, tuple[Sequence[Pair], str]],
    *,
    max_length: int,
    cache_dir: Path,
    device: Device,
    hooks: Hooks,
    on_batch: Callable[[], None] | None = None,
) -> dict[str, dict[str, Tensor]]:
    """A bi-encoder's unit embeddings of each pair's question and passage ([N, D] each, as `question_embedding`
    and `passage_embedding`) on each named data set (pairs, data sha256), from the cache or computed."""
    fingerprint = teacher_fingerprint(folder)
    found: dict[str, dict[str, Tensor]] = {}
    model = tokenizer = None
    for name, (pairs, data_sha) in datasets.items():
        path = cache_dir / "embeddings" / fingerprint / f"{data_sha}-len{max_length}.safetensors"
        cached = _read_cached_embeddings(path, len(pairs))
        if cached is not None:
            hooks.event("soft_labels", f"{folder.name} on {name}: reused cached embeddings {path}")
        else:
            texts, questions, passages = text_index(pairs)
            if model is None:
                model, tokenizer = _text_encoder(folder, device, cache_dir)
            runtime = "ONNX Runtime" if isinstance(model, OnnxTextEncoder) else "torch"
            hooks.event("soft_labels", f"embedding {len(texts)} texts of {name} with {folder.name} on {runtime}")
            cached = {
                "vectors": embed_texts(
                    model, tokenizer, texts, max_length=max_length, device=device, hooks=hooks, on_batch=on_batch
                ),
                "question_index": questions,
                "passage_index": passages,
            }
            _write_atomically(path, cached, teacher=fingerprint, data=data_sha, max_length=max_length)
            hooks.event("soft_labels", f"{folder.name} on {name}: embedded {len(texts)} texts into {path}")
        vectors = cached["vectors"]
        found[name] = {
            "question_embedding": vectors[cached["question_index"]],
            "passage_embedding": vectors[cached["passage_index"]],
        }
    return found


def _text_encoder(
    folder: Path, device: Device, cache_dir: Path
) -> tuple[TextEncoder, PreTrainedTokenizerBase]:
    """The bi-encoder in the model folder for inference: on the CPU exported to ONNX Runtime (faster), else torch."""
    model, tokenizer = load_bi_encoder(folder, device)
    if device.is_cuda:
        return model, tokenizer
    return onnx_text_encoder(model, tokenizer, cache_dir / "onnx") or model, tokenizer


def predict_logits(
    model: PreTrainedModel,
    encodings: EncodedPairs,
    *,
    device: Device,
    hooks: Hooks,
    on_batch: Callable[[], None] | None = None,
) -> Tensor:
    """A sequence classifier's 2-class logits [N, 2] (float32, CPU) on every encoded pair, in order.

    A 1-logit classifier (a relevance score) becomes [0, score], whose softmax is sigmoid(score).
    """
    out = torch.empty(len(encodings), 2)
    batches = iter_batches(encodings, batch_size=INFERENCE_BATCH, shuffle=False, seed=0)
    model.eval()
    with torch.inference_mode():
        for indices in batches:
            if hooks.cancel_requested():
                raise Cancelled("soft_labels: cancelled")
            logits = model(**device.move(encodings.collate(indices))).logits.float().cpu()
            if logits.shape[-1] == 1:
                logits = torch.cat([torch.zeros_like(logits), logits], dim=-1)
            out[torch.tensor(indices)] = logits
            if on_batch is not None:
                on_batch()
    return out


def count_batches(num_pairs: int) -> int:
    """Inference batches needed for `num_pairs` pairs."""
    return -(-num_pairs // INFERENCE_BATCH)


def _read_cached(path: Path, num_pairs: int) -> Tensor | None:
    if not path.is_file():
        return None
    logits = load_file(path)["logits"]
    if logits.shape != (num_pairs, 2):
        log.warning("ignoring %s: shape %s, expected (%d, 2)", path, tuple(logits.shape), num_pairs)
        return None
    return logits


def _read_cached_embeddings(path: Path, num_pairs: int) -> dict[str, Tensor] | None:
    if not path.is_file():
        return None
    tensors = load_file(path)
    if tensors["question_index"].shape != (num_pairs,) or tensors["passage_index"].shape != (num_pairs,):
        log.warning("ignoring %s: it indexes %d pairs, expected %d", path, len(tensors["question_index"]), num_pairs)
        return None
    return tensors


def _write_atomically(path: Path, tensors: dict[str, Tensor], *, teacher: str, data: str, max_length: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    metadata = {"teacher": teacher, "data": data, "max_length": str(max_length)}
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
