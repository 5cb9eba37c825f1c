"""Bi-encoders: the student that reads each side apart, zero-shot and fine-tuned teachers, calibration."""

import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from app.distill.biencoder import (
    COSINE_SCALE,
    BiEncoder,
    by_length,
    embed_pairs,
    in_batch_ranking_loss,
    load_bi_encoder,
)
from app.distill.calibration import platt_scaling
from app.distill.data import Pair, encode_separately
from app.distill.hooks import Hooks
from app.distill.onnx_runtime import onnx_text_encoder
from app.distill.pipeline import format_report, run_pipeline
from app.distill.soft_labels import reference_embeddings, teacher_soft_labels
from app.distill.spec import StudentSpec
from app.distill.students import build_student, calibrate_heads
from tests.unit.helpers import CPU, MAX_LENGTH, Recorder, make_tiny_base, tiny_spec

QUESTIONS = ["how are glacier caves formed ?", "who wrote hamlet ?", "who wrote hamlet ?"]
PASSAGES = [
    "a glacier cave is a cave formed within the ice of a glacier .",
    "hamlet is a tragedy written by william shakespeare .",
    "the ice facade is approximately 60 m high",
]


def test_the_student_encodes_each_side_exactly_as_if_alone(tmp_path: Path) -> None:
    base = make_tiny_base(tmp_path, num_layers=2)
    spec = StudentSpec(kind="bi-encoder", init_from=str(base), max_length=MAX_LENGTH)
    student, tokenizer = build_student(spec, ["a"], source_dir=base, tokenizer_dir=base, seed=0)
    pairs = tokenizer(QUESTIONS, PASSAGES, padding=True, return_tensors="pt")
    alone = BiEncoder(AutoModel.from_pretrained(base)).eval()

    with torch.inference_mode():
        question, passage = student.eval().encode(**pairs)

        def embed(texts: list[str]) -> torch.Tensor:
            return alone.embed(**tokenizer(texts, padding=True, return_tensors="pt", return_token_type_ids=False))

        torch.testing.assert_close(question, embed(QUESTIONS), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(passage, embed(PASSAGES), atol=1e-5, rtol=1e-4)
        # Untrained heads score COSINE_SCALE * cosine: the checkpoint's own zero-shot ranking.
        logits = student(**pairs)
    assert logits.shape == (3, 1, 2)
    torch.testing.assert_close(logits[:, 0, 1], COSINE_SCALE * (question * passage).sum(-1))


def test_a_batch_of_short_and_long_texts_embeds_in_chunks_as_in_one_padded_pass(tmp_path: Path) -> None:
    base = make_tiny_base(tmp_path, num_layers=2)
    model, tokenizer = BiEncoder(AutoModel.from_pretrained(base)).eval(), AutoTokenizer.from_pretrained(base)
    texts = [" ".join(["ice"] * (1 + (7 * i) % 23)) for i in range(40)]  # 1 to 23 words, shuffled lengths
    batch = tokenizer(texts, padding=True, return_tensors="pt", return_token_type_ids=False)
    widths = []

    def embed(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        widths.append(input_ids.shape)
        return model._embed(input_ids, attention_mask)

    with torch.inference_mode():
        chunked = by_length(embed, batch["input_ids"], batch["attention_mask"], rows=8)
        whole = model._embed(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-4)
    assert [rows for rows, _ in widths] == [8] * 5
    # Each chunk padded to its own longest text, not the batch's: little more than the real tokens.
    real, whole = int(batch["attention_mask"].sum()), batch["input_ids"].numel()
    assert sum(rows * width for rows, width in widths) <= 1.2 * real < 0.7 * whole


def test_a_bi_encoder_student_needs_an_init_model_and_token_types(tmp_path: Path, sample_data: Path) -> None:
    base = make_tiny_base(tmp_path)
    with pytest.raises(ValueError, match="student.init_from"):
        tiny_spec(tmp_path, sample_data, student={"kind": "bi-encoder", "init_from": None})
    student, tokenizer = build_student(
        StudentSpec(init_from=str(base)), ["a"], source_dir=base, tokenizer_dir=base, seed=0
    )
    batch = tokenizer(QUESTIONS, PASSAGES, padding=True, return_tensors="pt", return_token_type_ids=False)
    with pytest.raises(ValueError, match="token_type_ids"):
        student(**batch)


def test_soft_labels_of_a_bi_encoder_are_its_scaled_cosines_from_one_cached_pass(tmp_path: Path) -> None:
    base = make_tiny_base(tmp_path)
    model = BiEncoder(AutoModel.from_pretrained(base)).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    pairs = [Pair("q", q, p, None) for q, p in zip(QUESTIONS, PASSAGES, strict=True)]
    common = {"max_length": MAX_LENGTH, "cache_dir": tmp_path / "cache", "device": CPU}
    recorder = Recorder()
    logits = teacher_soft_labels(base, {"train": (pairs, "sha")}, kind="bi-encoder", hooks=recorder.hooks(), **common)
    batch = encode_separately(pairs, tokenizer, MAX_LENGTH).collate([0, 1, 2])
    with torch.inference_mode():
        expected = model(**batch)
    torch.testing.assert_close(logits["train"], expected, atol=1e-5, rtol=1e-4)
    assert (logits["train"][:, 0] == 0).all()
    assert recorder.messages("embedded 5 texts")  # each distinct text once: "who wrote hamlet ?" is asked twice

    # A student cut from this teacher matches its embeddings of the same pairs: the pass is not made again.
    recorder = Recorder()
    reference = reference_embeddings(base, {"train": (pairs, "sha")}, hooks=recorder.hooks(), **common)["train"]
    assert recorder.messages("reused cached embeddings") and not recorder.messages("embedded")
    cosine = (reference["question_embedding"] * reference["passage_embedding"]).sum(-1)
    torch.testing.assert_close(logits["train"][:, 1], COSINE_SCALE * cosine)


def _pairs_of_many_lengths(count: int) -> list[Pair]:
    """More texts than one CPU chunk holds, of many lengths: each chunk is padded to its own width."""
    return [Pair(str(i), f"question {i} " + "why ? " * (i % 7), "words " * (1 + i % 11), None) for i in range(count)]


def test_on_a_cpu_reference_embeddings_run_on_onnx_runtime_and_equal_torchs(tmp_path: Path) -> None:
    base = make_tiny_base(tmp_path)
    pairs = _pairs_of_many_lengths(40)
    recorder = Recorder()
    cache = tmp_path / "cache"
    found = reference_embeddings(
        base, {"train": (pairs, "sha")}, max_length=MAX_LENGTH, cache_dir=cache, device=CPU, hooks=recorder.hooks()
    )["train"]
    model, tokenizer = load_bi_encoder(base, CPU)
    expected = embed_pairs(model, tokenizer, pairs, max_length=MAX_LENGTH, device=CPU, hooks=Hooks())

    assert recorder.messages("on ONNX Runtime")
    torch.testing.assert_close(found["question_embedding"], expected[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(found["passage_embedding"], expected[1], atol=1e-5, rtol=1e-4)
    assert not list((cache / "onnx").rglob("*.onnx"))  # the exported graph is not left on disk


def test_exporting_a_bi_encoder_writes_no_warnings_into_the_jobs_log(tmp_path: Path) -> None:
    base = make_tiny_base(tmp_path)
    model, tokenizer = load_bi_encoder(base, CPU)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert onnx_text_encoder(model, tokenizer, tmp_path / "onnx") is not None
    assert [str(w.message) for w in caught] == []


def test_a_bi_encoder_the_exporter_cannot_trace_embeds_with_torch(tmp_path: Path, monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(torch.onnx, "export", fail)
    base = make_tiny_base(tmp_path)
    pairs = _pairs_of_many_lengths(40)
    recorder = Recorder()
    found = reference_embeddings(
        base, {"train": (pairs, "sha")}, max_length=MAX_LENGTH, cache_dir=tmp_path, device=CPU, hooks=recorder.hooks()
    )["train"]
    model, tokenizer = load_bi_encoder(base, CPU)
    expected = embed_pairs(model, tokenizer, pairs, max_length=MAX_LENGTH, device=CPU, hooks=Hooks())

    assert recorder.messages("on torch") and not recorder.messages("on ONNX Runtime")
    torch.testing.assert_close(found["question_embedding"], expected[0])


def test_the_in_batch_ranking_loss_falls_as_a_bi_encoder_trains(tmp_path: Path) -> None:
    base = make_tiny_base(tmp_path)
    torch.manual_seed(0)
    model = BiEncoder(AutoModel.from_pretrained(base))
    tokenizer = AutoTokenizer.from_pretrained(base)
    texts = zip(QUESTIONS * 2, PASSAGES * 2, strict=True)
    pairs = [Pair(str(i // 2), q, p, int(i % 2 == 0)) for i, (q, p) in enumerate(texts)]
    batch = encode_separately(pairs, tokenizer, MAX_LENGTH).collate(list(range(len(pairs))))
    batch |= {"labels": torch.tensor([p.label for p in pairs]), "group": torch.tensor([int(p.qid) for p in pairs])}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = in_batch_ranking_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0]


def test_platt_scaling_recovers_a_known_scale_and_shift() -> None:
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(20_000, generator=generator) * 3
    labels = (torch.rand(20_000, generator=generator) < torch.sigmoid(2.0 * scores - 1.0)).long()
    scale, shift = platt_scaling(scores, labels)
    assert scale == pytest.approx(2.0, rel=0.1) and shift == pytest.approx(-1.0, abs=0.1)
    assert platt_scaling(scores, torch.ones(20_000, dtype=torch.long)) == (1.0, 0.0)
    # Scores worse than chance keep their order: the scale stays positive, the shift gives the base rate.
    scale, shift = platt_scaling(-scores, labels)
    assert 0 < scale * 3 < 0.02
    assert torch.sigmoid(torch.tensor(shift)).item() == pytest.approx(labels.float().mean().item(), abs=0.01)


@pytest.mark.parametrize("kind", ["bi-encoder", "transformer"])
def test_calibrated_heads_keep_their_order_and_fit_the_labels(tmp_path: Path, kind: str) -> None:
    base = make_tiny_base(tmp_path)
    spec = StudentSpec(kind=kind, init_from=str(base), max_length=MAX_LENGTH)
    student, tokenizer = build_student(spec, ["a", "b"], source_dir=base, tokenizer_dir=base, seed=0)
    batch = tokenizer(QUESTIONS * 4, PASSAGES * 4, padding=True, return_tensors="pt")
    student.eval()
    with torch.inference_mode():
        before = student(**batch)[..., 1] - student(**batch)[..., 0]
    labels = (before[:, 0] > before[:, 0].median()).long()
    calibrate_heads(student, before, labels)
    with torch.inference_mode():
        after = student(**batch)[..., 1] - student(**batch)[..., 0]
    for h in range(2):
        # In the order `before` ranks the pairs, `after` never goes down (repeated pairs tie, to rounding).
        ranked = after[torch.argsort(before[:, h]), h]
        assert (torch.diff(ranked) >= -1e-4 * ranked.abs().max()).all()
    # Separable labels: calibrated probabilities sit on the right side of 0.5.
    assert ((torch.sigmoid(after[:, 0]) > 0.5).long() == labels).all()


def test_a_zero_shot_teacher_scores_as_its_bases_floor_on_every_evaluation_set(
    tmp_path: Path, sample_data: Path
) -> None:
    spec = tiny_spec(tmp_path, sample_data)
    base = spec.teachers[0].base
    data = spec.data.model_dump()
    data["eval"] = [data["eval"][0], data["train"]]
    zero_shot = {"name": "zero-shot", "base": base, "epochs": 0, "max_length": 128}
    trained = spec.teachers[0].model_dump() | {"name": "tuned"}
    spec = tiny_spec(tmp_path, sample_data, data=data, teachers=[zero_shot, trained])
    recorder = Recorder()
    result = run_pipeline(spec, out_dir=tmp_path / "out", hooks=recorder.hooks(), eval_names=["dev", "train"])

    assert result.teacher_dirs["zero-shot"] == Path(base)
    assert recorder.messages("used zero-shot as a bi-encoder")
    assert not (tmp_path / "out" / "teachers" / "zero-shot").exists()
    sets = result.metrics["sets"]
    assert [s["name"] for s in sets] == ["dev", "train"]
    assert result.metrics["rows"] == sets[0]["rows"]
    for table in sets:
        rows = {r["model"]: r for r in table["rows"]}
        assert rows["teacher:zero-shot"]["map"] == pytest.approx(rows[f"floor:{base}"]["map"])
        assert rows["teacher:zero-shot"]["below_floor"] is False
        assert {"teacher:tuned", "teacher-ensemble", "tmkd"} <= set(rows)
    # `qadistill distill` prints a table per set, marking rows under their floor.
    text = format_report(result.metrics)
    assert text.startswith("dev: ") and "\ntrain: " in text
    below = [r["model"] for t in sets for r in t["rows"] if r["below_floor"]]
    assert text.count(" !") == len(below)
