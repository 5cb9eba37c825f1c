"""Students: layer-subset initialisation, every encoder kind, and saved ensembles that load back the same."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, BertModel

from app.distill.export import EnsembleFormatError, load_ensemble, save_ensemble
from app.distill.spec import StudentSpec
from app.distill.students import build_student, default_layers
from tests.unit.helpers import MAX_LENGTH, make_tiny_base

HEADS = ["teacher-a", "teacher-b", "teacher-c"]
QUESTIONS = ["how are glacier caves formed ?", "how are glacier caves formed ?", "who wrote hamlet ?"]
PASSAGES = [
    "a glacier cave is a cave formed within the ice of a glacier .",
    "the ice facade is approximately 60 m high",
    "hamlet is a tragedy written by william shakespeare sometime between 1599 and 1601 .",
]


def test_chosen_layers_of_the_source_are_copied(tmp_path: Path) -> None:
    base = make_tiny_base(tmp_path, num_layers=4)
    spec = StudentSpec(init_from=str(base), layers=[0, 2], max_length=MAX_LENGTH)
    student, _ = build_student(spec, HEADS, source_dir=base, tokenizer_dir=base, seed=0)
    source = BertModel.from_pretrained(base)

    encoder = student.encoder
    assert encoder.config.num_hidden_layers == 2
    for kept, original in ((0, 0), (1, 2)):
        copied, expected = (
            encoder.encoder.layer[kept].state_dict(),
            source.encoder.layer[original].state_dict(),
        )
        assert all(torch.equal(copied[k], expected[k]) for k in expected)
    assert not torch.equal(
        encoder.encoder.layer[1].attention.self.query.weight,
        source.encoder.layer[1].attention.self.query.weight,
    )
    assert torch.equal(encoder.embeddings.word_embeddings.weight, source.embeddings.word_embeddings.weight)


def test_without_layers_the_student_keeps_num_layers_spread_over_the_source() -> None:
    assert default_layers(6, 3) == [0, 2, 4]
    assert default_layers(12, 4) == [0, 3, 6, 9]
    assert default_layers(2, 3) == [0, 1]


def test_a_layer_the_source_lacks_is_an_error_naming_the_field(tmp_path: Path) -> None:
    base = make_tiny_base(tmp_path)
    spec = StudentSpec(init_from=str(base), layers=[0, 5], max_length=MAX_LENGTH)
    with pytest.raises(ValueError, match=r"student.layers: .* has layers 0..1, not \[5\]"):
        build_student(spec, HEADS, source_dir=base, tokenizer_dir=base, seed=0)


def test_a_scratch_student_takes_the_spec_sizes_and_the_tokenizer_vocabulary(tmp_path: Path) -> None:
    base = make_tiny_base(tmp_path)
    spec = StudentSpec(
        init_from=None,
        num_layers=1,
        hidden_size=16,
        num_attention_heads=2,
        intermediate_size=32,
        max_length=32,
    )
    student, tokenizer = build_student(spec, HEADS, source_dir=None, tokenizer_dir=base, seed=0)
    config = student.encoder.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (1, 16, len(tokenizer))


@pytest.mark.parametrize("kind", ["bi-encoder", "transformer", "bilstm"])
def test_scores_do_not_depend_on_the_padding_of_the_batch(tmp_path: Path, kind: str) -> None:
    base = make_tiny_base(tmp_path)
    spec = StudentSpec(kind=kind, init_from=str(base), layers=[0, 1], embedding_dim=16, lstm_hidden=8)
    student, tokenizer = build_student(spec, HEADS, source_dir=base, tokenizer_dir=base, seed=0)
    student.eval()
    alone = tokenizer(QUESTIONS[1:2], PASSAGES[1:2], return_tensors="pt")
    padded = tokenizer(QUESTIONS, PASSAGES, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits_alone, logits_padded = student(**alone), student(**padded)
    assert logits_padded.shape == (3, len(HEADS), 2)
    torch.testing.assert_close(logits_padded[1], logits_alone[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["bi-encoder", "transformer", "bilstm"])
def test_a_saved_ensemble_loads_back_with_the_same_scores(tmp_path: Path, kind: str) -> None:
    base = make_tiny_base(tmp_path)
    spec = StudentSpec(
        kind=kind, init_from=str(base), layers=[1], max_length=MAX_LENGTH, embedding_dim=16, lstm_hidden=8
    )
    members, tokenizer = [], None
    for seed in (0, 1):
        student, tokenizer = build_student(spec, HEADS, source_dir=base, tokenizer_dir=base, seed=seed)
        members.append(student.eval())
    out = save_ensemble(
        members,
        tokenizer,
        tmp_path / "ens",
        variant="tmkd",
        heads=HEADS,
        spec={"student": spec.model_dump(mode="json")},
        metrics={"map": 0.5, "roc_auc": float("nan")},
    )

    ensemble = load_ensemble(out)
    scores = ensemble.score_pairs(QUESTIONS, PASSAGES)
    batch = tokenizer(QUESTIONS, PASSAGES, truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = torch.stack([torch.softmax(m(**batch), -1)[..., 1] for m in members], dim=1).numpy()
    np.testing.assert_allclose(scores.head_scores, expected, atol=1e-6)
    assert scores.member_scores.shape == (3, 2) and scores.scores.shape == (3,)
    np.testing.assert_allclose(scores.scores, expected.mean(axis=(1, 2)), atol=1e-6)
    assert ((scores.scores >= 0) & (scores.scores <= 1)).all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["members"] == ["member-0", "member-1"] and manifest["heads"] == HEADS
    assert manifest["metrics"]["roc_auc"] is None  # NaN is not JSON
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))


def test_a_transformer_member_folder_opens_with_automodel(tmp_path: Path) -> None:
    base = make_tiny_base(tmp_path)
    spec = StudentSpec(init_from=str(base), layers=[0], max_length=MAX_LENGTH)
    student, tokenizer = build_student(spec, HEADS, source_dir=base, tokenizer_dir=base, seed=0)
    out = save_ensemble(
        [student],
        tokenizer,
        tmp_path / "ens",
        variant="kd",
        heads=HEADS,
        spec={"student": spec.model_dump()},
        metrics={},
    )
    encoder = AutoModel.from_pretrained(out / "member-0")
    assert encoder.config.num_hidden_layers == 1
    assert torch.equal(encoder.embeddings.word_embeddings.weight, student.encoder.embeddings.word_embeddings.weight)


def test_a_folder_without_a_manifest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EnsembleFormatError, match="no manifest.json"):
        load_ensemble(tmp_path)


def test_a_bi_encoder_student_reads_each_side_of_a_pair_as_if_encoded_alone(tmp_path: Path) -> None:
    base = make_tiny_base(tmp_path)
    spec = StudentSpec(kind="bi-encoder", init_from=str(base), layers=[0, 1], max_length=MAX_LENGTH)
    student, tokenizer = build_student(spec, HEADS, source_dir=base, tokenizer_dir=base, seed=0)
    student.eval()
    pairs = tokenizer(QUESTIONS, PASSAGES, padding=True, return_tensors="pt")  # the first question twice
    with torch.no_grad():
        questions, passages = student.encode(**pairs)
        for i, (question, passage) in enumerate(zip(QUESTIONS, PASSAGES, strict=True)):
            alone = tokenizer([question, passage], padding=True, return_tensors="pt")
            expected = student.embed(alone["input_ids"], alone["attention_mask"])
            torch.testing.assert_close(questions[i], expected[0], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(passages[i], expected[1], atol=1e-6, rtol=1e-5)


def test_a_bi_encoder_student_encodes_each_distinct_side_of_a_batch_once(tmp_path: Path) -> None:
    base = make_tiny_base(tmp_path)
    spec = StudentSpec(kind="bi-encoder", init_from=str(base), layers=[0, 1], max_length=MAX_LENGTH)
    student, tokenizer = build_student(spec, HEADS, source_dir=base, tokenizer_dir=base, seed=0)
    # Two questions about one paragraph, each with its two sentences: 2 questions and 2 passages to encode.
    questions = [QUESTIONS[0]] * 2 + [QUESTIONS[2]] * 2
    passages = PASSAGES[:2] * 2
    pairs = tokenizer(questions, passages, padding=True, return_tensors="pt")
    encoded_rows = []
    student.encoder.embeddings.register_forward_hook(lambda _m, _args, out: encoded_rows.append(len(out)))
    with torch.no_grad():
        question, passage = student.eval().encode(**pairs)
    assert sorted(encoded_rows) == [2, 2]
    torch.testing.assert_close(passage[0], passage[2])
    torch.testing.assert_close(question[0], question[1])
