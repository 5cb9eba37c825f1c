"""run_pipeline end to end on tiny models: variants, M-on-M, the soft-label cache, resuming, the CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

from app.cli import cli
from app.distill import Cancelled, Hooks, Progress, load_ensemble, run_pipeline
from app.distill.biencoder import load_bi_encoder
from app.distill.data import read_pairs
from app.distill.export import load_member
from app.distill.pipeline import FLOOR_MAX_LENGTH
from app.distill.soft_labels import teacher_soft_labels
from app.distill.spec import DEFAULT_EMBEDDING_WEIGHT
from tests.unit.helpers import CPU, MAX_LENGTH, TEST_DEVICE, Recorder, make_tiny_base, tiny_data, tiny_spec


def test_every_variant_with_two_students_each_runs_end_to_end(tmp_path: Path, sample_data: Path) -> None:
    spec = tiny_spec(
        tmp_path,
        sample_data,
        variants=["kd", "mkd", "tkd", "tmkd"],
        ensemble_size=2,
        student={"init_from": "teacher-a", "layers": [1]},
    )
    recorder = Recorder()
    result = run_pipeline(spec, out_dir=tmp_path / "out", hooks=recorder.hooks())

    eval_pairs = read_pairs(spec.data.eval[0]).pairs
    for variant, heads in {"kd": 1, "mkd": 2, "tkd": 1, "tmkd": 2}.items():
        ensemble = load_ensemble(result.variant_dirs[variant])
        scores = ensemble.score_pairs([p.question for p in eval_pairs], [p.passage for p in eval_pairs])
        assert scores.head_scores.shape == (len(eval_pairs), 2, heads)
        assert ((scores.scores >= 0) & (scores.scores <= 1)).all()
        assert not np.allclose(scores.member_scores[:, 0], scores.member_scores[:, 1])  # seeds differ
    assert result.model_dir == tmp_path / "out" / "students" / "tmkd"
    for folder in result.teacher_dirs.values():
        assert AutoModelForSequenceClassification.from_pretrained(folder).config.num_labels == 2

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report == result.metrics and report["primary"] == "tmkd"
    models = [row["model"] for row in report["rows"]]
    base = spec.teachers[0].base
    assert models[:4] == [f"floor:{base}", "teacher:teacher-a", "teacher:teacher-b", "teacher-ensemble"]
    assert {"kd", "kd/member-0", "kd/member-1", "tmkd", "tmkd/member-1"} <= set(models)
    floor = report["rows"][0]["map"]
    for row in report["rows"][1:]:
        assert 0 <= row["map"] <= 1 and row["params"] > 0 and row["cpu_ms_per_question"] > 0
        assert row["floor"] == floor and row["below_floor"] == (row["map"] < floor)

    stages = list(dict.fromkeys(p.stage for p in recorder.progress))
    assert stages[:4] == ["prepare", "teacher:teacher-a", "teacher:teacher-b", "soft_labels"]
    assert "stage1:tkd/member-1" in stages and "stage1:kd/member-0" not in stages
    assert stages[-2:] == ["evaluate", "export"]
    fractions = [p.fraction for p in recorder.progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_a_second_run_reuses_the_soft_labels_and_finished_stages(tmp_path: Path, sample_data: Path) -> None:
    spec = tiny_spec(tmp_path, sample_data)
    cache = tmp_path / "cache"
    recorder = Recorder()
    first = run_pipeline(spec, out_dir=tmp_path / "out", cache_dir=cache, hooks=recorder.hooks())
    cached = {f: f.stat().st_mtime_ns for f in cache.rglob("*.safetensors")}
    # Both teachers keep their base's embeddings of the training texts: one pass of the base, cached, serves both.
    base = Path(spec.teachers[0].base).name
    anchors = [m for m in recorder.messages(f"{base} on train: ") if m.endswith(f"-len{MAX_LENGTH}.safetensors")]
    assert [message.split(": ")[1].split()[0] for message in anchors] == ["embedded", "reused"]
    # Bi-encoders' soft labels are cosines of cached embeddings: 2 teachers x train, eval, unlabeled; the base's
    # zero-shot floor on eval; what the teachers keep (train), and what the student matches in stages 1 and 2.
    assert len(list((cache / "embeddings").rglob("*.safetensors"))) == 6 + 1 + 1 + 2
    assert not (cache / "soft-labels").exists()

    recorder = Recorder()
    again = run_pipeline(spec, out_dir=tmp_path / "out", cache_dir=cache, hooks=recorder.hooks())

    assert {f: f.stat().st_mtime_ns for f in cache.rglob("*.safetensors")} == cached
    assert len(recorder.messages("reused cached embeddings")) == 6 + 1 + 2
    assert not recorder.messages("texts of")
    assert len(recorder.messages("already trained")) == 4  # 2 teachers, stage 1, stage 2
    assert [r["map"] for r in again.metrics["rows"]] == [r["map"] for r in first.metrics["rows"]]

    # A new run whose ready-made teacher is one trained above also finds its soft labels cached.
    ready = {"name": "ready", "path": str(first.teacher_dirs["teacher-a"]), "max_length": 32}
    recorder = Recorder()
    run_pipeline(
        tiny_spec(tmp_path, sample_data, variants=["kd"], teachers=[ready]),
        out_dir=tmp_path / "other",
        cache_dir=cache,
        hooks=recorder.hooks(),
    )
    assert {f: f.stat().st_mtime_ns for f in cache.rglob("*.safetensors")} == cached
    # Its soft labels on eval and train, the floor on eval, the student's reference on train for stage 2.
    assert len(recorder.messages("reused cached embeddings")) == 4


def test_an_interrupted_pipeline_resumes_to_the_same_students(tmp_path: Path, sample_data: Path) -> None:
    spec = tiny_spec(tmp_path, sample_data)
    uninterrupted = run_pipeline(spec, out_dir=tmp_path / "a", cache_dir=tmp_path / "cache-a")

    stage = {"name": "", "polls": 0}

    def on_progress(progress: Progress) -> None:
        if progress.stage != stage["name"]:
            stage.update(name=progress.stage, polls=0)

    def should_cancel() -> bool:
        stage["polls"] += 1
        return stage["name"] == "stage1:tmkd" and stage["polls"] == 3

    with pytest.raises(Cancelled, match="stage1:tmkd: cancelled at step 2"):
        run_pipeline(
            spec,
            out_dir=tmp_path / "b",
            cache_dir=tmp_path / "cache-b",
            hooks=Hooks(on_progress=on_progress, should_cancel=should_cancel),
        )
    recorder = Recorder()
    resumed = run_pipeline(spec, out_dir=tmp_path / "b", cache_dir=tmp_path / "cache-b", hooks=recorder.hooks())

    assert recorder.messages("resuming from the checkpoint at step 2")
    for file in ("model.safetensors", "heads.safetensors"):
        expected = load_file(uninterrupted.model_dir / "member-0" / file)
        got = load_file(resumed.model_dir / "member-0" / file)
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_different_spec_cannot_reuse_an_out_dir(tmp_path: Path, sample_data: Path) -> None:
    run_pipeline(tiny_spec(tmp_path, sample_data, variants=["kd"]), out_dir=tmp_path / "out")
    with pytest.raises(ValueError, match="out_dir: .* holds a run of a different spec"):
        run_pipeline(tiny_spec(tmp_path, sample_data, variants=["mkd"]), out_dir=tmp_path / "out")


def test_a_bilstm_student_runs_through_the_pipeline(tmp_path: Path, sample_data: Path) -> None:
    spec = tiny_spec(
        tmp_path,
        sample_data,
        variants=["tmkd"],
        student={
            "kind": "bilstm",
            "init_from": "teacher-b",
            "layers": None,
            "embedding_dim": 16,
            "lstm_hidden": 8,
        },
    )
    result = run_pipeline(spec, out_dir=tmp_path / "out")

    config = json.loads((result.model_dir / "member-0" / "student.json").read_text())
    assert config["kind"] == "bilstm" and config["heads"] == ["teacher-a", "teacher-b"]
    scores = load_ensemble(result.model_dir).score_pairs(["who wrote hamlet ?"], ["shakespeare wrote hamlet ."])
    assert 0 <= scores.scores[0] <= 1


def test_the_distill_command_prints_the_report(tmp_path: Path, sample_data: Path) -> None:
    spec = tiny_spec(tmp_path, sample_data, variants=["kd"], teachers=tiny_spec(tmp_path, sample_data).teachers[:1])
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    out = tmp_path / "out"

    result = CliRunner().invoke(cli, ["distill", str(spec_file), "--out", str(out), "--cache-dir", str(tmp_path / "c")])

    assert result.exit_code == 0, result.output
    assert "teacher:teacher-a" in result.output and "MAP" in result.output
    assert (out / "students" / "kd" / "manifest.json").is_file()


def test_the_distill_command_names_the_invalid_field(tmp_path: Path, sample_data: Path) -> None:
    fields = tiny_spec(tmp_path, sample_data).model_dump(mode="json")
    fields["stage2"]["batch_size"] = 0
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(fields))

    result = CliRunner().invoke(cli, ["distill", str(spec_file), "--out", str(tmp_path / "out")])

    assert result.exit_code == 2
    assert "stage2.batch_size: Input should be greater than or equal to 1" in result.output


def test_a_one_logit_teacher_gives_two_class_soft_labels(tmp_path: Path, sample_data: Path) -> None:
    base = make_tiny_base(tmp_path)
    folder = tmp_path / "scorer"
    AutoModelForSequenceClassification.from_pretrained(base, num_labels=1).save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    pairs = read_pairs(tiny_data(tmp_path, sample_data)["eval"]).pairs

    logits = teacher_soft_labels(
        folder,
        {"eval": (pairs, "sha")},
        max_length=32,
        cache_dir=tmp_path / "cache",
        device=TEST_DEVICE,
        hooks=Hooks(),
    )["eval"]

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    batch = AutoTokenizer.from_pretrained(folder)(
        [p.question for p in pairs],
        [p.passage for p in pairs],
        truncation="only_second",
        max_length=32,
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        scores = model(**batch).logits[:, 0]
    assert logits.shape == (len(pairs), 2) and torch.equal(logits[:, 0], torch.zeros(len(pairs)))
    torch.testing.assert_close(torch.softmax(logits, -1)[:, 1], torch.sigmoid(scores), atol=1e-5, rtol=1e-4)


def test_keep_start_averages_a_stage_with_the_weights_it_started_from(tmp_path: Path, sample_data: Path) -> None:
    base = make_tiny_base(tmp_path)
    student = {"init_from": str(base), "layers": [1]}
    plain = run_pipeline(tiny_spec(tmp_path, sample_data, variants=["kd"], student=student), out_dir=tmp_path / "a")
    kept = run_pipeline(
        tiny_spec(tmp_path, sample_data, variants=["kd"], student=student, stage2={"keep_start": 0.25}),
        out_dir=tmp_path / "b",
    )
    name = "encoder.layer.0.attention.self.query.weight"
    start = load_file(base / "model.safetensors")["encoder.layer.1.attention.self.query.weight"]
    trained = load_file(plain.model_dir / "member-0" / "model.safetensors")[name]
    mixed = load_file(kept.model_dir / "member-0" / "model.safetensors")[name]
    assert not torch.allclose(trained, start)
    torch.testing.assert_close(mixed, 0.25 * start + 0.75 * trained)


def _distance_to_base(member: Path, base: Path, texts: list[str]) -> float:
    """Mean squared distance between a bi-encoder student's unit text embeddings and its base's."""
    student = load_member(member).eval()
    reference, tokenizer = load_bi_encoder(base, CPU)
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.inference_mode():
        mine = student.embed(encoded["input_ids"], encoded["attention_mask"])
        theirs = reference.embed(encoded["input_ids"], encoded["attention_mask"])
    return float((mine - theirs).pow(2).sum(-1).mean())


def test_embedding_weight_pulls_the_students_embeddings_towards_the_reference(
    tmp_path: Path, sample_data: Path
) -> None:
    base = make_tiny_base(tmp_path)
    student = {"init_from": str(base), "layers": [1]}  # one of two layers: its embeddings differ from the base's
    stage2 = {"max_steps": 12}
    plain = run_pipeline(
        tiny_spec(tmp_path, sample_data, variants=["kd"], student=student, stage2=stage2 | {"embedding_weight": 0}),
        out_dir=tmp_path / "a",
    )
    recorder = Recorder()
    matched = run_pipeline(
        tiny_spec(tmp_path, sample_data, variants=["kd"], student=student, stage2=stage2 | {"embedding_weight": 20}),
        out_dir=tmp_path / "b",
        hooks=recorder.hooks(),
    )
    # the student's reference embeddings of the training texts (the teachers keep theirs at their own length)
    assert [m for m in recorder.messages(f"-len{FLOOR_MAX_LENGTH}.safetensors") if "on train: embedded" in m]
    pairs = read_pairs(Path(tiny_data(tmp_path, sample_data)["train"])).pairs
    texts = sorted({text for p in pairs for text in (p.question, p.passage)})
    before = _distance_to_base(plain.model_dir / "member-0", base, texts)
    after = _distance_to_base(matched.model_dir / "member-0", base, texts)
    assert after < 0.75 * before


def test_embedding_weight_needs_a_bi_encoder_student_of_the_references_width(
    tmp_path: Path, sample_data: Path
) -> None:
    assert tiny_spec(tmp_path, sample_data).embedding_weight("stage1") == DEFAULT_EMBEDDING_WEIGHT
    assert tiny_spec(tmp_path, sample_data, student={"kind": "transformer"}).embedding_weight("stage2") == 0
    with pytest.raises(ValidationError, match="stage1.embedding_weight"):
        tiny_spec(tmp_path, sample_data, student={"kind": "transformer"}, stage1={"embedding_weight": 1})
    wide = make_tiny_base(tmp_path, name="wide", hidden_size=64)
    spec = tiny_spec(tmp_path, sample_data, stage2={"embedding_weight": 1}, distill={"embedding_from": str(wide)})
    with pytest.raises(ValueError, match="distill.embedding_from: .* 64-wide embeddings, the student 32-wide"):
        run_pipeline(spec, out_dir=tmp_path / "run")


def test_a_soup_of_the_teachers_is_a_teacher_and_the_students_source(tmp_path: Path, sample_data: Path) -> None:
    teachers = [t.model_dump() for t in tiny_spec(tmp_path, sample_data).teachers]
    soup = {"name": "soup", "base": teachers[0]["base"], "average_of": ["teacher-a", "teacher-b"], "keep_base": 0.5}
    spec = tiny_spec(
        tmp_path, sample_data, teachers=[*teachers, soup], student={"init_from": "soup", "layers": [1]}
    )
    recorder = Recorder()
    result = run_pipeline(spec, out_dir=tmp_path / "out", hooks=recorder.hooks())

    assert recorder.messages("weights averaged over teacher-a, teacher-b, 0.5 of")
    assert recorder.messages("texts of train with soup")  # the student is cut from the soup and matches it
    weights = {name: load_file(folder / "model.safetensors") for name, folder in result.teacher_dirs.items()}
    layer = "encoder.layer.1.attention.output.dense.weight"
    base = load_file(Path(spec.teachers[0].base) / "model.safetensors")[layer]
    torch.testing.assert_close(
        weights["soup"][layer], 0.5 * base + 0.25 * (weights["teacher-a"][layer] + weights["teacher-b"][layer])
    )
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert {"teacher:soup", "teacher-ensemble"} <= {row["model"] for row in report["rows"]}
    assert load_ensemble(result.model_dir).heads == ["teacher-a", "teacher-b", "soup"]
