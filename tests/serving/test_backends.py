"""Every serving backend scores pairs as the core's fp32 ensemble does."""

from pathlib import Path

import numpy as np
import onnx as onnx_format
import torch

from app.distill.data import Pair
from app.distill.export import load_ensemble
from app.distill.manifest import read_manifest
from app.distill.onnx_runtime import export_onnx
from app.serving.backends import (
    ONNX_FILES,
    load_runner,
    quantize_onnx,
    serving_module,
)
from app.serving.pooled import FirstTokenStudent
from tests.serving.conftest import build_tiny_ensemble


def test_chunked_fp32_runner_equals_the_ensembles_own_scores(tiny_ensemble: Path, eval_pairs: list[Pair]) -> None:
    questions = [p.question for p in eval_pairs]
    passages = [p.passage for p in eval_pairs]
    expected = load_ensemble(tiny_ensemble).score_pairs(questions, passages)

    runner = load_runner(tiny_ensemble, backend="torch-fp32")
    runner.chunk_pairs = 7  # several length-sorted chunks, each padded on its own
    got = runner.score(questions, passages)

    np.testing.assert_allclose(got.scores, expected.scores, atol=1e-5)
    np.testing.assert_allclose(got.member_scores, expected.member_scores, atol=1e-5)
    np.testing.assert_allclose(got.head_scores, expected.head_scores, atol=1e-5)
    assert runner.heads == ["teacher-a", "teacher-b"]


def test_onnx_export_matches_torch_with_other_batch_and_sequence_sizes(
    tiny_ensemble: Path, eval_pairs: list[Pair], tmp_path: Path
) -> None:
    folder = tmp_path / "ensemble"
    folder.symlink_to(tiny_ensemble)  # reads the shared ensemble; writes only ONNX files beside it
    ensemble = load_ensemble(folder)
    members = [folder / name for name in read_manifest(folder).members]
    sample = ensemble.encode(["q ?", "q ?"], ["short", "a somewhat longer passage"])
    try:
        for member, member_dir in zip(ensemble.members, members, strict=True):
            export_onnx(serving_module(member), sample, member_dir / ONNX_FILES["onnx-fp32"])
            quantize_onnx(member_dir / ONNX_FILES["onnx-fp32"], member_dir / ONNX_FILES["onnx-int8"])
        questions = [p.question for p in eval_pairs[:23]]
        passages = [p.passage for p in eval_pairs[:23]]
        expected = ensemble.score_pairs(questions, passages)
        onnx = load_runner(folder, backend="onnx-fp32").score(questions, passages)
        int8 = load_runner(folder, backend="onnx-int8").score(questions, passages)
        heads_ops = [
            [n.op_type for n in onnx_format.load(str(m / ONNX_FILES["onnx-int8"])).graph.node if "heads" in n.name]
            for m in members
        ]
    finally:
        for member_dir in members:
            for filename in ONNX_FILES.values():
                (member_dir / filename).unlink(missing_ok=True)
    np.testing.assert_allclose(onnx.head_scores, expected.head_scores, atol=1e-5)
    assert np.abs(int8.scores - expected.scores).max() < 0.05
    # The heads, which form the scores from the pooled token alone, stay fp32 in the int8 model.
    assert all(ops and "MatMulInteger" not in ops for ops in heads_ops)


def test_first_token_form_gives_the_students_logits_and_bilstm_students_run_as_they_are(
    tiny_ensemble: Path, eval_pairs: list[Pair], train_pairs: list[Pair], tmp_path: Path
) -> None:
    transformer = load_ensemble(tiny_ensemble)
    batch = transformer.encode([p.question for p in eval_pairs[:9]], [p.passage for p in eval_pairs[:9]])
    assert batch["attention_mask"].min() == 0, "the batch should hold padding"
    member = transformer.members[0]
    fast = serving_module(member)
    assert isinstance(fast, FirstTokenStudent)
    with torch.inference_mode():
        torch.testing.assert_close(fast(**batch), member(**batch), atol=1e-5, rtol=1e-4)

    bilstm_dir = build_tiny_ensemble(tmp_path / "bilstm", train_pairs[:64], members=1, kind="bilstm")
    bilstm = load_ensemble(bilstm_dir)
    assert serving_module(bilstm.members[0]) is bilstm.members[0]
    questions = [p.question for p in eval_pairs[:12]]
    passages = [p.passage for p in eval_pairs[:12]]
    runner = load_runner(bilstm_dir, backend="torch-fp32")
    runner.chunk_pairs = 5
    np.testing.assert_allclose(
        runner.score(questions, passages).scores, bilstm.score_pairs(questions, passages).scores, atol=1e-5
    )
