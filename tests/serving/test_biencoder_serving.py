"""Bi-encoder members are served side by side: each distinct question and passage encoded once per batch.

The scores must equal the pair form's (the student's own forward over `[CLS] q [SEP] p [SEP]`) on every
backend, with the same tokens: the passage cut to fit, a too-long question cut as its own pair cuts it.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from app.distill.data import Pair
from app.distill.export import load_ensemble, save_ensemble
from app.distill.onnx_runtime import export_onnx
from app.distill.scoring import EmbeddingMember, score_encoded, split_sides, torch_forward
from app.distill.spec import StudentSpec
from app.distill.students import build_student
from app.serving.backends import CPU_BACKENDS, ONNX_FILES, half_precision, load_runner, quantize_onnx
from app.serving.optimize import optimize_for_serving
from tests.unit.helpers import make_tiny_base

HEADS = ["teacher-a", "teacher-b"]
MAX_LENGTH = 64
# Over max_length on its own: its pairs are cut longest_first, the question too.
LONG_QUESTION = "what " + " ".join(f"clause{i}" for i in range(70)) + " ?"
QUESTION = "which of the " + " ".join(f"word{i}" for i in range(18)) + " stories was written first ?"


@pytest.fixture(scope="module")
def bi_encoder_ensemble(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two random-weight bi-encoder members (tiny BERTs) whose heads weigh the dimensions unevenly."""
    root = tmp_path_factory.mktemp("bi-encoder")
    spec = StudentSpec(kind="bi-encoder", num_layers=2, max_length=MAX_LENGTH)
    members, tokenizer = [], None
    for seed in range(2):
        base = make_tiny_base(root, seed=seed, name=f"base-{seed}")
        student, tokenizer = build_student(spec, HEADS, source_dir=base, tokenizer_dir=base, seed=seed)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(seed)
            student.heads.weight.copy_(300 * torch.randn(student.heads.weight.shape, generator=generator))
            student.heads.bias.copy_(torch.tensor([-1.0, 1.0]))
        members.append(student.eval())
    return save_ensemble(members, tokenizer, root / "ensemble", variant="tmkd", heads=HEADS,
                         spec={"student": spec.model_dump(mode="json")}, metrics={})  # fmt: skip


def _texts(eval_pairs: list[Pair]) -> tuple[list[str], list[str]]:
    """The eval pairs, plus a too-long question and a passage long enough to be cut."""
    long_passage = " ".join(p.passage for p in eval_pairs[:3])
    questions = [p.question for p in eval_pairs] + [LONG_QUESTION, LONG_QUESTION, QUESTION, QUESTION]
    passages = [p.passage for p in eval_pairs] + [eval_pairs[0].passage, long_passage, long_passage, "short"]
    return questions, passages


def _pair_form(ensemble_dir: Path, questions: list[str], passages: list[str]):
    """Scores from the members' own pair forward: the reference the fast path must give."""
    ensemble = load_ensemble(ensemble_dir)
    forwards = [torch_forward(member) for member in ensemble.members]
    return score_encoded(ensemble.encoder(questions, passages), forwards, chunk_pairs=5)


def test_sides_are_the_pairs_own_tokens_and_each_distinct_side_is_encoded_once(
    bi_encoder_ensemble: Path, eval_pairs: list[Pair]
) -> None:
    ensemble = load_ensemble(bi_encoder_ensemble)
    tokenizer = ensemble.tokenizer
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    long_passage = " ".join(p.passage for p in eval_pairs[:3])
    questions = [QUESTION] * 10 + [LONG_QUESTION]
    passages = [p.passage for p in eval_pairs[:9]] + [long_passage, long_passage]
    encoded = ensemble.encoder(questions, passages)
    split = split_sides(encoded, cls)

    # One question side for the ten pairs of QUESTION, one per distinct passage, two for the long pair.
    assert len(split.sides) == 1 + 10 + 2
    assert len(set(split.question[:10].tolist())) == 1
    for i, ids in enumerate(encoded.input_ids):
        question, passage = split.sides.input_ids[split.question[i]], split.sides.input_ids[split.passage[i]]
        assert question[0] == cls and question[-1] == sep and passage[0] == cls and passage[-1] == sep
        assert question + passage[1:] == ids  # exactly the pair's tokens, nothing more nor less
    assert len(encoded.input_ids[9]) == MAX_LENGTH  # the long passage was cut to fit with QUESTION...
    full_question = tokenizer(QUESTION)["input_ids"]
    assert split.sides.input_ids[split.question[9]] == full_question  # ...which was kept whole
    # The too-long question was cut too (longest_first for its own pair only), and both sides fit.
    assert len(split.sides.input_ids[split.question[10]]) < len(tokenizer(LONG_QUESTION)["input_ids"])


def test_fast_path_scores_equal_the_pair_form_on_every_backend(
    bi_encoder_ensemble: Path, eval_pairs: list[Pair], tmp_path: Path
) -> None:
    questions, passages = _texts(eval_pairs)
    expected = _pair_form(bi_encoder_ensemble, questions, passages)
    assert expected.scores.std() > 0.01, "the heads should spread the scores"

    ensemble = load_ensemble(bi_encoder_ensemble)
    got = ensemble.score_pairs(questions, passages)
    np.testing.assert_allclose(got.head_scores, expected.head_scores, atol=1e-5)

    folder = shutil.copytree(bi_encoder_ensemble, tmp_path / "ensemble")
    serving = optimize_for_serving(folder, eval_pairs, threads=1)
    candidates = {c["backend"]: c for c in serving["candidates"]}
    assert set(candidates) == set(CPU_BACKENDS)
    assert all("ms_per_question" in c and "map" in c for c in candidates.values()), candidates
    # Every candidate was measured for MAP and batch drift: acceptable within 0.5 points and batch-invariant.
    for candidate in candidates.values():
        keeps = candidate["map"] >= serving["map_fp32"] - 0.005 and candidate["batch_drift"] <= 1e-4
        assert candidate["acceptable"] == keeps

    runner = load_runner(folder, backend="torch-fp32")
    assert all(isinstance(m, EmbeddingMember) for m in runner.members)
    np.testing.assert_allclose(runner.score(questions, passages).head_scores, expected.head_scores, atol=1e-5)

    if serving["backend"] in ONNX_FILES:
        onnx_file = folder / "member-0" / ONNX_FILES[serving["backend"]]
        session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
        assert [o.name for o in session.get_outputs()] == ["embeddings"]
        assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    served = load_runner(folder)
    assert served.backend == serving["backend"]
    assert all(isinstance(m, EmbeddingMember) for m in served.members)
    assert serving["backend"] in ("torch-fp32", "onnx-fp32")
    assert np.abs(served.score(questions, passages).scores - expected.scores).max() < 1e-5
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["serving"]["backend"] == serving["backend"]


def test_the_gpus_half_precision_member_keeps_its_heads_exact(
    bi_encoder_ensemble: Path, eval_pairs: list[Pair]
) -> None:
    questions, passages = _texts(eval_pairs)
    expected = _pair_form(bi_encoder_ensemble, questions, passages)
    member = load_ensemble(bi_encoder_ensemble).members[0]
    trained = member.heads.weight.detach().clone()
    half = half_precision(member)  # what torch-fp16 serves on CUDA (on the CPU here: the same dtypes)
    assert {p.dtype for p in half.encoder.parameters()} == {torch.float16}
    assert half.heads.weight.dtype == torch.float32 and torch.equal(half.heads.weight, trained)
    encoded = load_ensemble(bi_encoder_ensemble).encoder(questions, passages)
    got = score_encoded(encoded, [torch_forward(half)], chunk_pairs=5)
    assert np.abs(got.head_scores - expected.head_scores[:, :1]).max() < 0.02  # fp16 encoder, float32 heads


def test_onnx_side_encoder_equals_the_pair_form(
    bi_encoder_ensemble: Path, eval_pairs: list[Pair], tmp_path: Path
) -> None:
    folder = shutil.copytree(bi_encoder_ensemble, tmp_path / "ensemble")
    ensemble = load_ensemble(folder)
    # More rows than the CPU encodes in one chunk, of mixed lengths: the graph is still one pass for any batch.
    sample = ensemble.encode(["q ?"] * 20, ["a somewhat longer passage " * (1 + i % 4) for i in range(20)])
    for i, member in enumerate(ensemble.members):
        fp32, int8 = (folder / f"member-{i}" / ONNX_FILES[backend] for backend in ("onnx-fp32", "onnx-int8"))
        export_onnx(member, sample, fp32)
        quantize_onnx(fp32, int8)
    questions, passages = _texts(eval_pairs)
    expected = _pair_form(folder, questions, passages)

    onnx = load_runner(folder, backend="onnx-fp32", threads=1)
    try:
        assert all(isinstance(m, EmbeddingMember) for m in onnx.members)
        np.testing.assert_allclose(onnx.score(questions, passages).head_scores, expected.head_scores, atol=1e-5)
    finally:
        onnx.close()
    int8 = load_runner(folder, backend="onnx-int8", threads=1)
    try:
        assert np.abs(int8.score(questions, passages).scores - expected.scores).max() < 0.05
    finally:
        int8.close()


def test_a_pairs_score_is_the_same_alone_and_batched_with_long_questions(
    bi_encoder_ensemble: Path, eval_pairs: list[Pair]
) -> None:
    passage = " ".join(p.passage for p in eval_pairs[:3])
    runner = load_runner(bi_encoder_ensemble, backend="torch-fp32")
    alone = runner.score([QUESTION], [passage])
    questions = [LONG_QUESTION, QUESTION, LONG_QUESTION] + [p.question for p in eval_pairs[:20]]
    passages = [eval_pairs[5].passage, passage, passage] + [p.passage for p in eval_pairs[:20]]
    batched = runner.score(questions, passages)
    np.testing.assert_allclose(batched.head_scores[1], alone.head_scores[0], atol=1e-6)
    reference = _pair_form(bi_encoder_ensemble, [QUESTION], [passage])
    np.testing.assert_allclose(alone.head_scores, reference.head_scores, atol=1e-5)
