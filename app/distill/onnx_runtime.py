"""ONNX export and ONNX Runtime sessions: for serving, and for the teachers' inference passes on the CPU.

On a CPU, ONNX Runtime embeds the same chunks of text as torch 1.1-1.27x faster for all-mpnet-base-v2 and up to
1.18x for all-MiniLM-L6-v2 (2-core AMD EPYC hosts, vectors equal to 1.3e-6 or better; benchmarks/results/
quality.md), so the pipeline's embedding passes (teachers' soft labels, their bases' anchors and floors, a
student's reference embeddings) run there: `onnx_text_encoder`.
"""

import inspect
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from app.distill.biencoder import BiEncoder, by_length
from app.distill.students import BiEncoderStudent

log = logging.getLogger(__name__)


class SideEncoder(nn.Module):
    """A bi-encoder's side encoder: forward(input_ids, attention_mask) -> unit vectors [B, D]."""

    def __init__(self, model: BiEncoder | BiEncoderStudent) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Unit-length vectors of single sides, rows right-padded."""
        return self.model.embed(input_ids, attention_mask)


def export_onnx(member: nn.Module, sample: dict[str, Tensor], path: Path) -> None:
    """Write a model as ONNX with dynamic batch and sequence axes (TorchScript-based exporter).

    A bi-encoder (a student member or a teacher) is written as its SideEncoder (output `embeddings`), which
    takes `sample`'s input_ids and attention_mask as sides: any padded token rows trace the same graph.
    """
    output = "logits"
    if isinstance(member, BiEncoder | BiEncoderStudent):
        member, output = SideEncoder(member), "embeddings"
    # The exporter names graph inputs in forward()'s parameter order, whatever the order of `sample`.
    names = [name for name in inspect.signature(member.forward).parameters if name in sample]
    axes = {name: {0: "batch", 1: "sequence"} for name in names} | {output: {0: "batch"}}
    tmp = path.with_suffix(".tmp")
    # The dynamo exporter needs onnxscript, which is not a dependency; the TorchScript one handles these encoders,
    # with outputs that match torch to ~1e-6. Its warnings are about the exporter and about Python branches on
    # shapes that are the same for any padded batch of these encoders (the tests export batches of many lengths):
    # nothing the user of a job can act on, so they stay out of the job's log.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter's, about itself
        warnings.filterwarnings("ignore", "Exporting aten::index operator", UserWarning)
        torch.onnx.export(
            member.eval(),
            (),
            str(tmp),
            kwargs={name: sample[name] for name in names},
            input_names=names,
            output_names=[output],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    os.replace(tmp, path)


def onnx_session(path: Path, threads: int, *, spinning: bool = True) -> Any:
    """An ONNX Runtime CPU session on `threads` intra-op threads; spinning=False lets idle threads sleep."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxTextEncoder:
    """A bi-encoder's `embed` on ONNX Runtime, in the same length-sorted chunks as torch's (`by_length`)."""

    def __init__(self, session: Any, width: int) -> None:
        self.session = session
        self.width = width

    def embed(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Unit-length text embeddings [B, D] of right-padded rows."""
        return by_length(self._run, input_ids, attention_mask)

    def _run(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        feed = {"input_ids": input_ids.contiguous().numpy(), "attention_mask": attention_mask.contiguous().numpy()}
        return torch.from_numpy(self.session.run(None, feed)[0])


def onnx_text_encoder(
    model: BiEncoder, tokenizer: PreTrainedTokenizerBase, work_dir: Path
) -> OnnxTextEncoder | None:
    """The model exported to ONNX Runtime (on torch's thread count), or None where the export fails.

    The file is written under work_dir and deleted once the session holds the graph.
    """
    # Rows of different lengths, so that the traced graph is the one that handles padding.
    sample = tokenizer(["a sample text", "another sample text, a longer one"], padding=True, return_tensors="pt")
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix="onnx-", dir=work_dir) as tmp:
            path = Path(tmp) / "encoder.onnx"
            export_onnx(model, sample, path)
            session = onnx_session(path, torch.get_num_threads())
    except Exception as err:  # an architecture the exporter cannot trace: torch embeds instead
        log.warning("ONNX export of the bi-encoder failed, embedding with torch: %s", err)
        return None
    return OnnxTextEncoder(session, model.width)
