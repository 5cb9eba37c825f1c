"""Run an ensemble folder's members on one inference backend: torch fp32/int8/fp16 or ONNX Runtime fp32/int8.

Every backend encodes and scores through the core's one path (app/distill/scoring.py): each pair
tokenised on its own, length-sorted chunks padded on their own, logits combined in one place; only the
members' forwards differ. Each (chunk, member) forward is a separate piece of work: on ONNX Runtime they
run side by side, one per core. A bi-encoder member is served by its side encoder (each distinct question
and passage encoded once, the heads applied to the unit vectors in numpy): its ONNX file is that side
encoder, with outputs named `embeddings` instead of `logits`.
"""

import logging
import os
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoTokenizer

from app.distill.export import StudentEnsemble, load_ensemble, read_cosine_heads
from app.distill.manifest import EnsembleManifest, read_manifest
from app.distill.onnx_runtime import onnx_session
from app.distill.scoring import (
    DEFAULT_CHUNK_PAIRS,
    Batch,
    EmbeddingMember,
    Member,
    PairEncoder,
    PairScores,
    score_encoded,
    torch_member,
)
from app.distill.students import CosineHeads
from app.serving.pooled import FirstTokenStudent, supports_first_token

log = logging.getLogger(__name__)

CPU_BACKENDS = ("torch-fp32", "torch-int8", "onnx-fp32", "onnx-int8")
CUDA_BACKEND = "torch-fp16"
ONNX_FILES = {"onnx-fp32": "model.onnx", "onnx-int8": "model.int8.onnx"}


class BackendError(RuntimeError):
    """A backend cannot run this ensemble (missing files, unsupported on this machine)."""


@dataclass
class EnsembleRunner:
    """Scores (question, passage) pairs with every member of an ensemble on one backend."""

    backend: str
    encoder: PairEncoder
    members: list[Member]
    heads: list[str]
    size_bytes: int
    chunk_pairs: int = DEFAULT_CHUNK_PAIRS
    pool: Executor | None = None  # runs the (chunk, member) forwards side by side, one core each

    def close(self) -> None:
        """Stop the forward threads, if any."""
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def score(self, questions: Sequence[str], passages: Sequence[str]) -> PairScores:
        """P(relevant) of each pair, overall, per member and per head; blocking, call off the event loop."""
        encoded = self.encoder(questions, passages)
        run = map if self.pool is None else self.pool.map
        return score_encoded(encoded, self.members, chunk_pairs=self.chunk_pairs, run=run)


def member_dirs(ensemble_dir: Path, manifest: EnsembleManifest) -> list[Path]:
    """The members' folders, in the manifest's order."""
    return [ensemble_dir / name for name in manifest.members]


def serving_backend(manifest: EnsembleManifest, device: str) -> str:
    """The backend to serve with: fp16 torch on CUDA, else what registration chose (fp32 torch by default)."""
    if device == "cuda":
        return CUDA_BACKEND
    return manifest.serving.backend if manifest.serving is not None else "torch-fp32"


def load_runner(
    ensemble_dir: Path, *, backend: str | None = None, device: str = "cpu", threads: int = 0
) -> EnsembleRunner:
    """Load an ensemble folder for serving on `backend` (None: the one its manifest records for `device`)."""
    manifest = read_manifest(ensemble_dir)
    backend = backend or serving_backend(manifest, device)
    if backend in ONNX_FILES:
        runner = onnx_runner(ensemble_dir, manifest, backend, threads=threads)
    else:
        runner = torch_runner(load_ensemble(ensemble_dir, device="cpu"), backend)
    log.info("loaded %s on %s: %d members, %.1f MB",
             ensemble_dir, backend, len(runner.members), runner.size_bytes / 1e6)
    return runner


def torch_runner(ensemble: StudentEnsemble, backend: str) -> EnsembleRunner:
    """Run an ensemble's torch members as they are (fp32), int8-quantised, or in fp16 on CUDA."""
    device = torch.device("cuda" if backend == CUDA_BACKEND else "cpu")
    members = [torch_member(_prepare_torch_member(m, backend), device) for m in ensemble.members]
    size = sum(_parameter_bytes(m) for m in ensemble.members)
    return EnsembleRunner(backend, ensemble.encoder, members, list(ensemble.heads), size)


def onnx_runner(ensemble_dir: Path, manifest: EnsembleManifest, backend: str, *, threads: int) -> EnsembleRunner:
    """Run the members' ONNX files (written by optimize_for_serving) with ONNX Runtime on the CPU.

    The (chunk, member) forwards run side by side, one per core: that scales better than splitting each
    forward's small matrices across cores. `threads` is each forward's intra-op threads (0: one).
    """
    paths = [folder / ONNX_FILES[backend] for folder in member_dirs(ensemble_dir, manifest)]
    threads = threads or 1
    parallel = max(1, (os.cpu_count() or 1) // threads)
    members = [_onnx_member(path, threads) for path in paths]
    pool = ThreadPoolExecutor(parallel, thread_name_prefix="serve-forward") if parallel > 1 else None
    tokenizer = AutoTokenizer.from_pretrained(member_dirs(ensemble_dir, manifest)[0])
    size = sum(path.stat().st_size for path in paths)
    encoder = PairEncoder(tokenizer, manifest.max_length)
    return EnsembleRunner(backend, encoder, members, list(manifest.heads), size, pool=pool)


def quantize_onnx(source: Path, target: Path) -> None:
    """ONNX Runtime's dynamic int8 quantisation of a member's weights (activations quantised per batch).

    The matrices after the last attention softmax stay in fp32: in a first-token student they act on the
    pooled token alone (cheap) and form the scores, where int8 rounding cost up to 1.3 MAP points.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = target.with_suffix(".tmp")
    # 7-bit weights (reduce_range) avoid the u8 x s8 saturation of AVX2 / non-VNNI AVX-512 kernels, which
    # a model registered on one machine may be served on; per-channel scales keep the accuracy.
    quantize_dynamic(
        str(source),
        str(tmp),
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=True,
        nodes_to_exclude=_after_last_softmax(source),
    )
    os.replace(tmp, target)


def _after_last_softmax(path: Path) -> list[str]:
    """The MatMul and Gemm nodes that follow the graph's last Softmax (nodes are in topological order)."""
    import onnx

    nodes = onnx.load(str(path)).graph.node
    softmaxes = [i for i, node in enumerate(nodes) if node.op_type == "Softmax"]
    if not softmaxes:
        return []
    names = []
    for node in nodes[softmaxes[-1] + 1 :]:
        if node.op_type == "MatMul":
            names.append(node.name)
        elif node.op_type == "Gemm":  # the quantiser splits a Gemm into "<name>_MatMul" and an Add first
            names += [node.name, f"{node.name}_MatMul"]
    return names


def serving_module(member: nn.Module) -> nn.Module:
    """The member in its fastest exact form: last layer for the pooled token only where supported."""
    member.eval()
    return FirstTokenStudent(member) if supports_first_token(member) else member


def half_precision(member: nn.Module) -> nn.Module:
    """The member in fp16 (in place) but for its cosine heads, which stay float32: their weights (about 20) would round
    to steps of 0.016 in fp16, and they score in float32 anyway (CosineHeads, scoring.torch_member)."""
    heads = {id(p) for m in member.modules() if isinstance(m, CosineHeads) for p in m.parameters()}
    with torch.no_grad():
        for parameter in member.parameters():
            if id(parameter) not in heads and parameter.is_floating_point():
                parameter.data = parameter.data.half()
        for module in member.modules():
            for name, buffer in module.named_buffers(recurse=False):
                if buffer.is_floating_point():
                    setattr(module, name, buffer.half())
    return member


def _prepare_torch_member(member: nn.Module, backend: str) -> nn.Module:
    member = serving_module(member)
    if backend == "torch-fp32":
        return member
    if backend == "torch-int8":
        return torch.ao.quantization.quantize_dynamic(member, {nn.Linear}, dtype=torch.qint8)
    if backend == CUDA_BACKEND:
        if not torch.cuda.is_available():
            raise BackendError("torch-fp16 needs a CUDA GPU")
        return half_precision(member).to("cuda")
    raise BackendError(f"unknown backend {backend!r}; expected one of {(*CPU_BACKENDS, CUDA_BACKEND)}")


def _onnx_member(path: Path, threads: int) -> Member:
    """A member's ONNX file in a session: its pair forward, or for a side encoder an EmbeddingMember."""
    if not path.is_file():
        raise BackendError(f"{path} is missing: the ensemble was not optimised for ONNX Runtime")
    # Idle threads sleep instead of spinning: on a few shared cores spinning steals the time that the
    # event loop, tokenisation and the other members need.
    session = onnx_session(path, threads, spinning=False)
    wanted = [i.name for i in session.get_inputs()]

    def forward(batch: Batch) -> np.ndarray:
        return session.run(None, {name: batch[name] for name in wanted})[0]

    if session.get_outputs()[0].name != "embeddings":
        return forward
    weight, bias, cls_token_id = read_cosine_heads(path.parent)
    return EmbeddingMember(forward, weight, bias, cls_token_id)


def _parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
