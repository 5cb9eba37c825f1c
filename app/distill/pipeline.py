"""run_pipeline: teachers -> soft labels -> stage 1 -> stage 2 -> evaluate -> export, as one plain call.

Every stage finds its finished artifact and moves on, so a rerun with the same out_dir continues where an
interrupted one stopped (training resumes from its last checkpoint) and a finished run is not redone.

out_dir/
    spec.json                       the spec (and data hashes) the folder belongs to
    teachers/<name>/                fine-tuned teachers (Hugging Face folders)
    checkpoints/<stage>/...         training checkpoints, e.g. checkpoints/stage1/tmkd/member-0
    students/<variant>/             one student ensemble per variant (see app.distill.export)
    report.json                     the metrics table
"""

import functools
import hashlib
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig

from app.distill.biencoder import COSINE_SCALE, BiEncoder
from app.distill.calibration import calibrated, platt_scaling
from app.distill.data import Pair, encode_pairs, file_sha256, group_by_question, iter_batches, read_pairs
from app.distill.devices import Device, resolve_device
from app.distill.export import StudentEnsemble, save_ensemble
from app.distill.hooks import Hooks, Progress
from app.distill.losses import embedding_loss, multi_head_listwise_loss, multi_head_loss, relevance
from app.distill.manifest import json_safe
from app.distill.metrics import ranking_metrics
from app.distill.pretrained import resolve_model
from app.distill.side_by_side import plan, train_side_by_side
from app.distill.soft_labels import count_batches, reference_embeddings, teacher_soft_labels
from app.distill.spec import VARIANTS_WITH_STAGE1, PipelineSpec, StageSpec, TeacherSpec
from app.distill.students import build_student, calibrate_heads, count_parameters
from app.distill.teachers import load_teacher, prepare_teacher
from app.distill.train import TrainConfig, count_steps, mix_weights, train

METRIC_KEYS = ("map", "mrr", "p_at_1", "accuracy", "roc_auc")
TIMING_CANDIDATES = 10
FLOOR_MAX_LENGTH = 128  # WikiQA and TrecQA passages are at most ~60 tokens
CALIBRATION_PAIRS = 2000  # training pairs (whole questions) a listwise student's heads are calibrated on
TIMING_REPEATS = 5
EVAL_BATCH = 64
# What a student batch carries besides the model's inputs.
TARGET_KEYS = ("labels", "teacher_logits", "group", "question_embedding", "passage_embedding")
STUDENT_STAGES = ("stage1:", "stage2:")


@dataclass
class PipelineResult:
    """Where a run's artifacts are and its report."""

    out_dir: Path
    model_dir: Path
    variant_dirs: dict[str, Path]
    teacher_dirs: dict[str, Path]
    metrics: dict


@dataclass
class _Data:
    """The run's pairs and their content hashes; unlabeled is empty when no variant has stage 1.

    evals holds each evaluation set's pairs by its report name; sha256 is keyed 'train', 'unlabeled'
    and 'eval:<i>'.
    """

    train: list[Pair]
    evals: dict[str, list[Pair]]
    unlabeled: list[Pair]
    sha256: dict[str, str]

    @property
    def eval(self) -> list[Pair]:
        """The first evaluation set: the one registration chooses the serving form on."""
        return next(iter(self.evals.values()))

    def eval_sets(self) -> list[tuple[str, str, list[Pair]]]:
        """(key in sha256, report name, pairs) of every evaluation set, in the spec's order."""
        return [(f"eval:{i}", name, pairs) for i, (name, pairs) in enumerate(self.evals.items())]


def run_pipeline(
    spec: PipelineSpec,
    *,
    out_dir: Path,
    cache_dir: Path | None = None,
    hooks: Hooks | None = None,
    eval_names: Sequence[str] | None = None,
    processes: int | None = None,
) -> PipelineResult:
    """Run the whole distillation of `spec` (data paths are files) into out_dir; resumable and idempotent.

    Soft labels are cached under cache_dir (default out_dir/cache) and shared by later runs. eval_names
    name the evaluation sets in the report (default: each file's folder and stem, e.g. 'wikiqa/dev').
    On a CPU the variants' students train side by side in up to `processes` child processes (None: one per
    thread torch uses, when there are enough steps to gain from it; 1: in this process; see
    app.distill.side_by_side).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    soft_cache = Path(cache_dir) if cache_dir is not None else out_dir / "cache"
    device = resolve_device(spec.device)
    caller = hooks or Hooks()

    caller.progress(Progress("prepare", 0, 1))
    data = _read_data(spec, eval_names)
    _claim_out_dir(out_dir, spec, data)
    weights = _stage_weights(spec, data)
    hooks = _pipeline_hooks(caller, weights)
    hooks.event(
        "prepare",
        f"{len(data.train)} labelled, {sum(map(len, data.evals.values()))} eval in {len(data.evals)} sets, "
        f"{len(data.unlabeled)} unlabelled pairs; "
        f"device {device.torch_device}",
    )
    hooks.progress(Progress("prepare", 1, 1))

    teacher_dirs: dict[str, Path] = {}
    for t in spec.teachers:  # in order: a soup averages teachers listed before it
        teacher_dirs[t.name] = prepare_teacher(
            t,
            train_pairs=data.train,
            out_dir=out_dir,
            cache_dir=cache_dir,
            device=device,
            hooks=hooks,
            checkpoint_every=spec.checkpoint_every,
            teacher_dirs=teacher_dirs,
            anchor=functools.partial(_base_embeddings, t, data, cache_dir, soft_cache, device, hooks),
        )
    soft, floors = _soft_labels(spec, data, teacher_dirs, cache_dir=soft_cache, device=device, hooks=hooks)

    source_dir = _student_source(spec, teacher_dirs, cache_dir)
    tokenizer_dir = source_dir or teacher_dirs[spec.teachers[0].name]
    reference = _reference_embeddings(spec, data, teacher_dirs, source_dir, soft_cache, device, hooks)
    arguments = {
        "spec": spec, "data": data, "soft": soft, "reference": reference, "source_dir": source_dir,
        "tokenizer_dir": tokenizer_dir, "out_dir": out_dir, "device": device,
    }  # fmt: skip
    threads = torch.get_num_threads()
    groups = plan(_student_steps(spec, weights), threads, processes) if device.torch_device.type == "cpu" else []
    student_hooks = hooks
    if groups:
        train_side_by_side(groups, arguments, threads=threads, hooks=hooks)
        # Each stage is trained: the students load from their final checkpoints, without reporting again.
        student_hooks = replace(hooks, on_progress=None, on_event=None)
    students = {v: train_variant(variant=v, hooks=student_hooks, **arguments) for v in spec.variants}
    tokenizer = next(iter(students.values()))[1]
    members = {v: m for v, (m, _) in students.items()}

    report = _evaluate(spec, data, soft, floors, teacher_dirs, members, tokenizer, device, hooks)
    variant_dirs = _export(spec, members, tokenizer, report, out_dir, hooks)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    hooks.event("export", f"report written to {out_dir / 'report.json'}")
    return PipelineResult(
        out_dir=out_dir,
        model_dir=variant_dirs[spec.primary_variant],
        variant_dirs=variant_dirs,
        teacher_dirs=teacher_dirs,
        metrics=report,
    )


def member_stage(stage: str, variant: str, member: int, ensemble_size: int) -> str:
    """A student stage's name: 'stage1:tmkd', or 'stage1:tmkd/member-2' in an ensemble of several."""
    return f"{stage}:{variant}" if ensemble_size == 1 else f"{stage}:{variant}/member-{member}"


def distillation_loss(
    model: nn.Module, batch: dict[str, Tensor], *, temperature: float, alpha: float, embedding_weight: float = 0.0
) -> Tensor:
    """Multi-head KD loss of a student batch: soft labels per head, plus hard labels if the batch has them."""
    logits, embedding_term = _student_outputs(model, batch, embedding_weight)
    loss = multi_head_loss(logits, batch["teacher_logits"], batch.get("labels"), temperature=temperature, alpha=alpha)
    return loss + embedding_term


def _student_outputs(model: nn.Module, batch: dict[str, Tensor], embedding_weight: float) -> tuple[Tensor, Tensor]:
    """The student's logits on the batch, and embedding_weight * its embeddings' distance to the reference's."""
    inputs = {k: v for k, v in batch.items() if k not in TARGET_KEYS}
    if not embedding_weight:
        logits = model(**inputs).float()
        return logits, logits.new_zeros(())
    question, passage = model.encode(**inputs)
    distance = embedding_loss(question, batch["question_embedding"])
    distance = distance + embedding_loss(passage, batch["passage_embedding"])
    return model.score(question, passage).float(), embedding_weight * distance


def _read_data(spec: PipelineSpec, eval_names: Sequence[str] | None) -> _Data:
    needs_unlabeled = any(v in VARIANTS_WITH_STAGE1 for v in spec.variants)
    files = {"train": spec.data.train} | {f"eval:{i}": path for i, path in enumerate(spec.data.eval)}
    if needs_unlabeled and spec.data.unlabeled:
        files["unlabeled"] = spec.data.unlabeled
    names = list(eval_names) if eval_names is not None else [_set_name(path) for path in spec.data.eval]
    if len(names) != len(spec.data.eval):
        raise ValueError(f"eval_names: {len(names)} names for {len(spec.data.eval)} evaluation sets")
    names = [name if names.count(name) == 1 else f"{name}#{i}" for i, name in enumerate(names)]
    return _Data(
        train=read_pairs(files["train"], labelled=True).pairs,
        evals={name: read_pairs(path, labelled=True).pairs for name, path in zip(names, spec.data.eval, strict=True)},
        unlabeled=read_pairs(files["unlabeled"], labelled=False).pairs if "unlabeled" in files else [],
        sha256={name: file_sha256(path) for name, path in files.items()},
    )


def _set_name(path: str) -> str:
    """A report name for an evaluation file: its folder and stem ('wikiqa/dev')."""
    file = Path(path)
    return f"{file.parent.name}/{file.stem}" if file.parent.name else file.stem


def _claim_out_dir(out_dir: Path, spec: PipelineSpec, data: _Data) -> None:
    """Record which spec and data out_dir belongs to; a different one there would resume the wrong run."""
    identity = {"spec": spec.model_dump(mode="json", exclude={"data"}), "data_sha256": data.sha256}
    marker = out_dir / "spec.json"
    if marker.is_file():
        if json.loads(marker.read_text()) != identity:
            raise ValueError(
                f"out_dir: {out_dir} holds a run of a different spec or data; use a new folder to start over"
            )
        return
    marker.write_text(json.dumps(identity, indent=2))


def _stage_weights(spec: PipelineSpec, data: _Data) -> dict[str, float]:
    """Rough work per stage, in optimiser steps or inference batches, to turn progress into a fraction."""
    weights: dict[str, float] = {"prepare": 1.0}
    for t in spec.teachers:
        weights[f"teacher:{t.name}"] = (
            0.0 if t.path else count_steps(len(data.train), t.batch_size, t.epochs, t.max_steps)
        )
    evals = sum(map(len, data.evals.values()))
    pairs = len(data.train) + evals + len(data.unlabeled)
    weights["soft_labels"] = (len(spec.teachers) + 1) * count_batches(pairs)
    for variant in spec.variants:
        for i in range(spec.ensemble_size):
            if variant in VARIANTS_WITH_STAGE1:
                weights[member_stage("stage1", variant, i, spec.ensemble_size)] = _stage_steps(
                    spec.stage1, len(data.unlabeled)
                )
            weights[member_stage("stage2", variant, i, spec.ensemble_size)] = _stage_steps(spec.stage2, len(data.train))
    weights["evaluate"] = len(spec.variants) * spec.ensemble_size * count_batches(evals) + 1
    weights["export"] = 1.0
    return weights


def _stage_steps(stage: StageSpec, num_pairs: int) -> int:
    return count_steps(num_pairs, stage.batch_size, stage.epochs, stage.max_steps)


def _student_steps(spec: PipelineSpec, weights: dict[str, float]) -> dict[str, float]:
    """Each variant's optimiser steps over its students' stages (every member), in the spec's order."""
    return {
        variant: sum(
            weights.get(member_stage(stage, variant, i, spec.ensemble_size), 0.0)
            for stage in ("stage1", "stage2")
            for i in range(spec.ensemble_size)
        )
        for variant in spec.variants
    }


def _pipeline_hooks(hooks: Hooks, weights: dict[str, float]) -> Hooks:
    """The caller's hooks, with progress carrying the pipeline's fraction done.

    Stages run in the order of `weights`, but the students' stages may run side by side: their part is the sum
    of what each has done, so the fraction only grows.
    """
    total = sum(weights.values()) or 1.0
    starts, cumulative = {}, 0.0
    for stage, weight in weights.items():
        starts[stage] = cumulative
        cumulative += weight
    students = [stage for stage in weights if stage.startswith(STUDENT_STAGES)]
    students_start = starts[students[0]] if students else 0.0
    student_done: dict[str, float] = {}

    def on_progress(progress: Progress) -> None:
        part = weights.get(progress.stage, 0.0) * progress.step / max(1, progress.total)
        if progress.stage.startswith(STUDENT_STAGES):
            student_done[progress.stage] = part
            done = students_start + sum(student_done.values())
        else:
            done = starts.get(progress.stage, 0.0) + part
        progress.fraction = min(1.0, done / total)
        if hooks.on_progress is not None:
            hooks.on_progress(progress)

    return replace(hooks, on_progress=on_progress)


def _soft_labels(
    spec: PipelineSpec,
    data: _Data,
    teacher_dirs: dict[str, Path],
    *,
    cache_dir: Path,
    device: Device,
    hooks: Hooks,
) -> tuple[dict[str, dict[str, Tensor]], dict[str, dict[str, Tensor]]]:
    """Each teacher's logits [N, 2] per data set ('train', 'unlabeled', 'eval:<i>'), and each base's floor.

    A bi-encoder teacher's cosines are Platt-scaled on the training pairs, so that every teacher's
    softmax is a P(relevant) and they average. The floors are the logits of each base checkpoint used
    zero-shot as a bi-encoder on the evaluation sets: what a distilled model must beat.
    """
    stage1_teachers = {t.name for v in spec.variants if v in VARIANTS_WITH_STAGE1 for t in spec.teachers_for(v)}
    eval_sets = {key: (pairs, data.sha256[key]) for key, _, pairs in data.eval_sets()}
    wanted: dict[str, dict[str, tuple[Sequence[Pair], str]]] = {}
    for t in spec.teachers:
        # Every teacher scores the training pairs: stage 2 learns from them and calibration fits on them.
        sets = eval_sets | {"train": (data.train, data.sha256["train"])}
        if t.name in stage1_teachers:
            sets["unlabeled"] = (data.unlabeled, data.sha256["unlabeled"])
        wanted[t.name] = sets
    bases = _floor_bases(spec)
    base_dirs = {base: resolve_model(base, cache_dir=cache_dir) for base in bases}
    total = sum(count_batches(len(pairs)) for sets in wanted.values() for pairs, _ in sets.values())
    total += len(bases) * sum(count_batches(len(pairs)) for pairs, _ in eval_sets.values())
    done = 0

    def on_batch() -> None:
        nonlocal done
        done += 1
        if done % 10 == 0:
            hooks.progress(Progress("soft_labels", done, total))

    hooks.progress(Progress("soft_labels", 0, total))
    common = {"cache_dir": cache_dir, "device": device, "hooks": hooks, "on_batch": on_batch}
    found = {
        t.name: teacher_soft_labels(
            teacher_dirs[t.name], wanted[t.name], max_length=t.max_length, kind=t.kind, **common
        )
        for t in spec.teachers
    }
    labels = torch.tensor([p.label for p in data.train])
    for t in spec.teachers:
        if t.kind == "bi-encoder":
            scale, shift = platt_scaling(relevance(found[t.name]["train"]), labels)
            found[t.name] = {key: calibrated(logits, scale, shift) for key, logits in found[t.name].items()}
    floors = {
        base: teacher_soft_labels(folder, eval_sets, max_length=FLOOR_MAX_LENGTH, kind="bi-encoder", **common)
        for base, folder in base_dirs.items()
    }
    hooks.progress(Progress("soft_labels", total, total))
    return found, floors


def _base_embeddings(
    teacher: TeacherSpec,
    data: _Data,
    cache_dir: Path | None,
    soft_cache: Path,
    device: Device,
    hooks: Hooks,
    rows: list[int] | None,
) -> dict[str, Tensor]:
    """The teacher's base checkpoint's unit embeddings of the training pairs at `rows` (None: all), which it keeps
    while it fine-tunes; cached like the students' reference embeddings, so teachers of one base compute them once."""
    base = resolve_model(teacher.base, cache_dir=cache_dir)
    pairs, sha = data.train, data.sha256["train"]
    if rows is not None:
        pairs = [pairs[i] for i in rows]
        sha = hashlib.sha256(f"{sha}:rows:{','.join(map(str, rows))}".encode()).hexdigest()
    return reference_embeddings(
        base, {"train": (pairs, sha)}, max_length=teacher.max_length, cache_dir=soft_cache, device=device, hooks=hooks
    )["train"]


def _floor_bases(spec: PipelineSpec) -> list[str]:
    """The base checkpoints the teachers and the student start from, each once."""
    teacher_names = {t.name for t in spec.teachers}
    bases = [t.base for t in spec.teachers if t.path is None]
    if spec.student.init_from is not None and spec.student.init_from not in teacher_names:
        bases.append(spec.student.init_from)
    return list(dict.fromkeys(bases))


def _row_bases(spec: PipelineSpec) -> dict[str, list[str]]:
    """The bases whose floors each report row must beat: its own; every teacher's for the ensemble."""
    teacher_bases = {t.name: t.base for t in spec.teachers if t.path is None}
    init = spec.student.init_from
    student_base = teacher_bases.get(init, init) if init is not None else None
    bases = {f"teacher:{name}": [base] for name, base in teacher_bases.items()}
    bases["teacher-ensemble"] = list(dict.fromkeys(teacher_bases.values()))
    for variant in spec.variants:
        bases[variant] = [student_base] if student_base else []
    return bases


def _student_source(spec: PipelineSpec, teacher_dirs: dict[str, Path], cache_dir: Path | None) -> Path | None:
    """student.init_from as a folder: a teacher's folder when it names a teacher, None from scratch."""
    init_from = spec.student.init_from
    if init_from is None:
        return None
    if init_from in teacher_dirs:
        return teacher_dirs[init_from]
    return resolve_model(init_from, cache_dir=cache_dir)


def _reference_embeddings(
    spec: PipelineSpec,
    data: _Data,
    teacher_dirs: dict[str, Path],
    source_dir: Path | None,
    cache_dir: Path,
    device: Device,
    hooks: Hooks,
) -> dict[str, dict[str, Tensor]]:
    """Per stage with an embedding_weight: distill.embedding_from's unit embeddings of each pair's question and
    passage ([N, D] each, as `question_embedding` and `passage_embedding`), cached like the soft labels."""
    stage_sets = {"stage1": "unlabeled", "stage2": "train"}
    wanted = {stage: key for stage, key in stage_sets.items() if spec.embedding_weight(stage) and getattr(data, key)}
    if not wanted:
        return {}
    name = spec.distill.embedding_from
    folder = source_dir if name is None else teacher_dirs.get(name) or resolve_model(name, cache_dir=cache_dir)
    width = AutoConfig.from_pretrained(folder).hidden_size
    student_width = AutoConfig.from_pretrained(source_dir).hidden_size
    if width != student_width:
        raise ValueError(
            f"distill.embedding_from: {name or spec.student.init_from} gives {width}-wide embeddings, "
            f"the student {student_width}-wide"
        )
    datasets = {key: (getattr(data, key), data.sha256[key]) for key in wanted.values()}
    found = reference_embeddings(
        folder, datasets, max_length=FLOOR_MAX_LENGTH, cache_dir=cache_dir, device=device, hooks=hooks
    )
    return {stage: found[key] for stage, key in wanted.items()}


def train_variant(
    *,
    spec: PipelineSpec,
    variant: str,
    data: _Data,
    soft: dict[str, dict[str, Tensor]],
    reference: dict[str, dict[str, Tensor]],
    source_dir: Path | None,
    tokenizer_dir: Path,
    out_dir: Path,
    device: Device,
    hooks: Hooks,
    calibrate: bool = True,
) -> tuple[list[nn.Module], Any]:
    """The variant's students (M-on-M: ensemble_size of them, seeds seed+i), each through its stages.

    With the listwise loss, batches hold whole questions and each student's heads are calibrated on the
    training pairs at the end (a ranking loss leaves the level of the scores free); `calibrate` False leaves
    them as trained (a child process of app.distill.side_by_side: the parent loads and calibrates them).
    """
    heads = [t.name for t in spec.teachers_for(variant)]
    listwise = spec.distill.loss == "listwise"
    stages: list[tuple[str, StageSpec, list[Pair], dict[str, Tensor]]] = []
    if variant in VARIANTS_WITH_STAGE1:
        stage1_targets = {"teacher_logits": torch.stack([soft[h]["unlabeled"] for h in heads], dim=1)}
        stages.append(("stage1", spec.stage1, data.unlabeled, stage1_targets | reference.get("stage1", {})))
    stage2_targets = {
        "teacher_logits": torch.stack([soft[h]["train"] for h in heads], dim=1),
        "labels": torch.tensor([p.label for p in data.train], dtype=torch.long),
    }
    stages.append(("stage2", spec.stage2, data.train, stage2_targets | reference.get("stage2", {})))

    # Per stage, for every member: each question's pairs. Batches draw whole questions at random: batched a
    # paragraph at a time (each shared sentence encoded once, stage 1 twice as fast) tmkd lost 0.8 points of TrecQA
    # MAP on the same teachers, two of its three seeds under MiniLM's floor (benchmarks/results/quality.md).
    grouped = {name: group_by_question(pairs) for name, _, pairs, _ in stages} if listwise else {}
    members, tokenizer, encoded = [], None, {}
    for i in range(spec.ensemble_size):
        seed = spec.seed + i
        student, tokenizer = build_student(
            spec.student, heads, source_dir=source_dir, tokenizer_dir=tokenizer_dir, seed=seed
        )
        for name, stage_spec, pairs, targets in stages:
            if name not in encoded:
                encoded[name] = encode_pairs(pairs, tokenizer, spec.student.max_length)
            groups = grouped.get(name)
            if groups is not None:
                targets = targets | {"group": _question_index(groups, len(pairs))}
            stage = member_stage(name, variant, i, spec.ensemble_size)
            loss_fn = functools.partial(
                listwise_distillation_loss if listwise else distillation_loss,
                temperature=spec.distill.temperature,
                alpha=spec.distill.alpha,
                embedding_weight=spec.embedding_weight(name),
            )
            start = {k: v.detach().clone() for k, v in student.state_dict().items()} if stage_spec.keep_start else None
            train(
                student,
                stage=stage,
                encodings=encoded[name],
                targets=targets,
                loss_fn=loss_fn,
                config=TrainConfig(
                    learning_rate=stage_spec.learning_rate,
                    batch_size=stage_spec.batch_size,
                    epochs=stage_spec.epochs,
                    seed=seed,
                    weight_decay=stage_spec.weight_decay,
                    warmup_ratio=stage_spec.warmup_ratio,
                    max_steps=stage_spec.max_steps,
                    head_learning_rate=stage_spec.head_learning_rate,
                    checkpoint_every=spec.checkpoint_every,
                ),
                checkpoint_dir=out_dir / "checkpoints" / Path(*stage.replace(":", "/").split("/")),
                device=device,
                hooks=hooks,
                groups=groups,
            )
            if start is not None:
                mix_weights(student, start, stage_spec.keep_start)
        if listwise and calibrate:
            _calibrate(student, data.train, encoded["stage2"], device)
        members.append(student)
    return members, tokenizer


def listwise_distillation_loss(
    model: nn.Module, batch: dict[str, Tensor], *, temperature: float, alpha: float, embedding_weight: float = 0.0
) -> Tensor:
    """Multi-head listwise KD loss of a batch of whole questions (`group`), hard labels if it has them."""
    logits, embedding_term = _student_outputs(model, batch, embedding_weight)
    loss = multi_head_listwise_loss(
        logits, batch["teacher_logits"], batch.get("labels"), batch["group"], temperature=temperature, alpha=alpha
    )
    return loss + embedding_term


def _question_index(groups: list[list[int]], count: int) -> Tensor:
    """Which question (index into groups) each of `count` pairs belongs to."""
    index = torch.empty(count, dtype=torch.long)
    for q, members in enumerate(groups):
        index[members] = q
    return index


def _calibrate(student: nn.Module, pairs: list[Pair], encodings: Any, device: Device) -> None:
    """Platt-scale the student's heads on the first CALIBRATION_PAIRS training pairs (whole questions)."""
    picked: list[int] = []
    for members in group_by_question(pairs):
        if len(picked) >= CALIBRATION_PAIRS:
            break
        picked += members
    student.eval()
    logits = []
    with torch.inference_mode():
        for start in range(0, len(picked), EVAL_BATCH):
            batch = device.move(encodings.collate(picked[start : start + EVAL_BATCH]))
            logits.append(student(**batch).float().cpu())
    labels = torch.tensor([pairs[i].label for i in picked])
    calibrate_heads(student, relevance(torch.cat(logits)), labels)


def _evaluate(
    spec: PipelineSpec,
    data: _Data,
    soft: dict[str, dict[str, Tensor]],
    floors: dict[str, dict[str, Tensor]],
    teacher_dirs: dict[str, Path],
    members: dict[str, list[nn.Module]],
    tokenizer: Any,
    device: Device,
    hooks: Hooks,
) -> dict:
    """The report: per evaluation set, a table of every base's zero-shot floor, teacher and student.

    Each row's `floor` is the best zero-shot MAP of the bases it started from, and `below_floor` flags
    a row under it. CPU latency is measured once per model, on the first set's first question.
    """
    questions, passages = _timing_sample(data.eval)
    cpu = resolve_device("cpu")
    steps, done = len(spec.teachers) + len(spec.variants), 0
    hooks.progress(Progress("evaluate", 0, steps))
    scores: dict[str, dict[str, Tensor]] = {key: {} for key, _, _ in data.eval_sets()}
    costs: dict[str, tuple[int, float | None]] = {}

    for base, logits in floors.items():
        for key in scores:
            # Ranked by the cosine itself: sigmoid(scale * cosine) rounds to 1.0 in float32.
            scores[key][f"floor:{base}"] = relevance(logits[key]) / COSINE_SCALE
        costs[f"floor:{base}"] = (0, None)
    teacher_params, teacher_ms = 0, 0.0
    for t in spec.teachers:
        for key in scores:
            scores[key][f"teacher:{t.name}"] = torch.softmax(soft[t.name][key], dim=-1)[:, 1]
        model, teacher_tokenizer = load_teacher(teacher_dirs[t.name], cpu, t.kind)
        score = _score_with_bi_encoder if t.kind == "bi-encoder" else _score_with_teacher
        cpu_ms = _cpu_ms(functools.partial(score, model, teacher_tokenizer, t.max_length, questions, passages))
        costs[f"teacher:{t.name}"] = (count_parameters(model), cpu_ms)
        teacher_params += costs[f"teacher:{t.name}"][0]
        teacher_ms += cpu_ms  # the teachers run one after the other
        done += 1
        hooks.progress(Progress("evaluate", done, steps))
    if len(spec.teachers) > 1:
        for by_model in scores.values():
            by_model["teacher-ensemble"] = torch.stack([by_model[f"teacher:{t.name}"] for t in spec.teachers]).mean(0)
        costs["teacher-ensemble"] = (teacher_params, teacher_ms)

    max_length = spec.student.max_length
    for variant, students in members.items():
        heads = students[0].head_names
        ensemble = StudentEnsemble(
            students, tokenizer, max_length=max_length, heads=heads, device=str(device.torch_device)
        )
        for key, _, pairs in data.eval_sets():
            member_scores = _member_scores(ensemble, pairs, max_length)
            scores[key][variant] = member_scores.mean(1)
            if len(students) > 1:
                for i in range(len(students)):
                    scores[key][f"{variant}/member-{i}"] = member_scores[:, i]
        params = [count_parameters(s) for s in students]
        on_cpu = StudentEnsemble(students, tokenizer, max_length=max_length, heads=heads)
        costs[variant] = (sum(params), _cpu_ms_of_ensemble(on_cpu, questions, passages))
        if len(students) > 1:
            for i, student in enumerate(students):
                alone = StudentEnsemble([student], tokenizer, max_length=max_length, heads=heads)
                costs[f"{variant}/member-{i}"] = (params[i], _cpu_ms_of_ensemble(alone, questions, passages))
        done += 1
        hooks.progress(Progress("evaluate", done, steps))

    row_bases = _row_bases(spec)
    sets = []
    for key, name, pairs in data.eval_sets():
        qids, labels = [p.qid for p in pairs], [p.label for p in pairs]
        rows, floor_of = [], {}  # floor_of: a base's zero-shot MAP on this set (its rows come first)
        for model, model_scores in scores[key].items():
            quality = ranking_metrics(qids, model_scores.tolist(), labels)
            params, cpu_ms = costs[model]
            floor_maps = [floor_of[b] for b in row_bases.get(model.split("/")[0], []) if b in floor_of]
            floor = max(floor_maps) if floor_maps else None
            if model.startswith("floor:"):
                floor_of[model.removeprefix("floor:")] = quality["map"]
                quality["accuracy"] = None  # a cosine, not a probability: no threshold to count
            rows.append(
                {"model": model}
                | {k: quality[k] for k in METRIC_KEYS}
                | {
                    "params": params or None,
                    "cpu_ms_per_question": None if cpu_ms is None else round(cpu_ms, 3),
                    "floor": floor,
                    "below_floor": floor is not None and quality["map"] < floor,
                }
            )
            flag = " (below its zero-shot floor)" if rows[-1]["below_floor"] else ""
            hooks.event("evaluate", f"{name}: {model}: MAP {quality['map']:.4f}, MRR {quality['mrr']:.4f}{flag}")
        sets.append({"name": name, "pairs": len(pairs), "questions": len(set(qids)), "rows": rows})
    return json_safe(
        {
            "sets": sets,
            # The first set's table, the one registration and serving use.
            "rows": sets[0]["rows"],
            "eval": {"name": sets[0]["name"], "pairs": sets[0]["pairs"], "questions": sets[0]["questions"]},
            "primary": spec.primary_variant,
        }
    )


def _member_scores(ensemble: StudentEnsemble, pairs: list[Pair], max_length: int) -> Tensor:
    """P(relevant) of every pair by every member: [N, members]."""
    encodings = encode_pairs(pairs, ensemble.tokenizer, max_length)
    out = torch.empty(len(pairs), len(ensemble.members))
    for indices in iter_batches(encodings, batch_size=EVAL_BATCH, shuffle=False, seed=0):
        member_scores = ensemble.score_batch(encodings.collate(indices)).member_scores
        out[torch.tensor(indices)] = torch.from_numpy(member_scores).float()
    return out


def _export(
    spec: PipelineSpec,
    members: dict[str, list[nn.Module]],
    tokenizer: Any,
    report: dict,
    out_dir: Path,
    hooks: Hooks,
) -> dict[str, Path]:
    """Save every variant's ensemble under out_dir/students/<variant>, with its report row as metrics."""
    rows = {row["model"]: row for row in report["rows"]}
    variant_dirs = {}
    for i, (variant, students) in enumerate(members.items()):
        hooks.progress(Progress("export", i, len(members)))
        variant_dirs[variant] = save_ensemble(
            students,
            tokenizer,
            out_dir / "students" / variant,
            variant=variant,
            heads=students[0].head_names,
            spec=spec,
            metrics=rows[variant],
        )
        hooks.event("export", f"{variant}: ensemble of {len(students)} saved to {variant_dirs[variant]}")
    hooks.progress(Progress("export", len(members), len(members)))
    return variant_dirs


def _timing_sample(pairs: Sequence[Pair]) -> tuple[list[str], list[str]]:
    """One question with TIMING_CANDIDATES candidate passages (the first eval question, passages cycled)."""
    question = pairs[0].question
    passages = [pairs[i % len(pairs)].passage for i in range(TIMING_CANDIDATES)]
    return [question] * TIMING_CANDIDATES, passages


def _cpu_ms(score: Callable[[], object]) -> float:
    """Median wall milliseconds of one call of `score` after a warm-up call."""
    score()
    times = []
    for _ in range(TIMING_REPEATS):
        start = time.perf_counter()
        score()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _cpu_ms_of_ensemble(ensemble: StudentEnsemble, questions: list[str], passages: list[str]) -> float:
    return _cpu_ms(functools.partial(ensemble.score_pairs, questions, passages))


def _score_with_bi_encoder(
    model: BiEncoder, tokenizer: Any, max_length: int, questions: list[str], passages: list[str]
) -> Tensor:
    """A bi-encoder's scores of one question's candidates: the question encoded once, the passages in a batch."""
    texts = [questions[0], *passages]
    batch = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    with torch.inference_mode():
        embeddings = model.embed(batch["input_ids"], batch["attention_mask"])
    return embeddings[1:] @ embeddings[0]


def _score_with_teacher(
    model: nn.Module, tokenizer: Any, max_length: int, questions: list[str], passages: list[str]
) -> Tensor:
    batch = tokenizer(
        questions,
        passages,
        truncation="longest_first",
        max_length=max_length,
        padding=True,
        return_tensors="pt",
    )
    with torch.inference_mode():
        return model(**batch).logits


def format_report(report: dict) -> str:
    """The report as plain-text tables, one per evaluation set, one row per model (the paper's ablation table).

    A row under the zero-shot floor of the base it started from is marked `!`.
    """
    columns = [
        ("model", "model", "{}"),
        ("map", "MAP", "{:.4f}"),
        ("mrr", "MRR", "{:.4f}"),
        ("p_at_1", "P@1", "{:.4f}"),
        ("accuracy", "acc", "{:.4f}"),
        ("roc_auc", "AUC", "{:.4f}"),
        ("params", "params", "{:,}"),
        ("cpu_ms_per_question", "CPU ms/q", "{:.1f}"),
        ("floor", "floor", "{:.4f}"),
    ]
    blocks = []
    for table in report["sets"]:
        cells = [[title for _, title, _ in columns]]
        for row in table["rows"]:
            cells.append(["-" if row.get(k) is None else fmt.format(row[k]) for k, _, fmt in columns])
            if row.get("below_floor"):
                cells[-1][-1] += " !"
        widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
        lines = [
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
            for r in cells
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.insert(0, f"{table['name']}: {table['questions']} questions, {table['pairs']} pairs")
        blocks.append("\n".join(lines))
    flagged = any(row.get("below_floor") for table in report["sets"] for row in table["rows"])
    below = "; ! below its zero-shot floor" if flagged else ""
    return "\n\n".join(blocks) + f"\nprimary: {report['primary']}{below}"
