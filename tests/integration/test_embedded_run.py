"""`qadistill run` (what `make run` starts): migrate, seed `demo`, print a key, serve, stop the worker on exit."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from app.db.models import Dataset
from app.db.session import session_scope
from app.embedded import prepare_demo
from app.settings import Settings

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(home: Path, port: int) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "QADISTILL_HOME": str(home), "QADISTILL_PORT": str(port), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", "from app.cli import main; main()", "run"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    first = process.stdout.readline()
    assert first.startswith("API key: "), first
    return process, first.removeprefix("API key: ").strip()


def _wait_ready(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail("the embedded service did not become ready")


def _stop(process: subprocess.Popen[str], sig: int = signal.SIGINT) -> list[str]:
    """Ctrl-C (or terminate) the service; returns the pids of the worker processes it had started."""
    children = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(process.pid)], capture_output=True, text=True
    ).stdout.split()
    process.send_signal(sig)
    assert process.wait(timeout=60) == (0 if sig == signal.SIGINT else 128 + sig)
    return children


def _assert_all_gone(workers: list[str]) -> None:
    assert workers, "qadistill run started no worker process"
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(_alive(pid) for pid in workers), "the worker outlived the service"


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    return True


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", "from app.cli import main; main()", *args]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def _tiny_job(tiny_base: Path) -> dict:
    return {
        "name": "demo-cli",
        "variants": ["kd"],
        "data": {"train": "demo", "eval": "demo"},
        "teachers": [{"name": "t1", "path": str(tiny_base), "max_length": 32}],
        "student": {"init_from": str(tiny_base), "layers": [0], "max_length": 32},
        "stage2": {"max_steps": 2},
        "device": "cpu",
    }


def test_run_serves_the_demo_and_reuses_its_key(tmp_path, tiny_base):
    home, port = tmp_path / "home", _free_port()
    url = f"http://127.0.0.1:{port}"
    process, key = _start(home, port)
    try:
        _wait_ready(port)
        datasets = httpx.get(f"{url}/v1/datasets", headers={"Authorization": f"Bearer {key}"}).json()
        assert [(d["name"], d["pairs"], d["questions"]) for d in datasets["data"]] == [("demo", 150, 30)]

        spec = tmp_path / "job.json"
        spec.write_text(json.dumps(_tiny_job(tiny_base)))
        submitted = _cli("submit", str(spec), "--url", url, "--key", key, "--follow")
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.split()[0]
        assert submitted.stdout.strip().splitlines()[-1] == f"job {job_id}: succeeded; model demo-cli:1"
        status = _cli("status", job_id, "--url", url, "--key", key, "--json")
        assert json.loads(status.stdout)["model"] == {"name": "demo-cli", "version": 1}
    finally:
        workers = _stop(process)
    _assert_all_gone(workers)

    # A second start keeps the key and the single demo dataset.
    settings = Settings(home=home)
    assert prepare_demo(settings) == key
    with session_scope(settings.database_url) as session:
        assert session.scalar(select(func.count()).select_from(Dataset)) == 1


def test_terminating_run_stops_its_worker(tmp_path):
    port = _free_port()
    process, _ = _start(tmp_path / "home", port)
    try:
        _wait_ready(port)
    finally:
        workers = _stop(process, signal.SIGTERM)
    _assert_all_gone(workers)
