"""A running embedded service (`qadistill run` in a subprocess: the API on a free port and a real worker)."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 120


@dataclass
class Service:
    """Where the service listens, the demo tenant's key and the home folder it keeps its state in."""

    url: str
    key: str
    home: Path
    process: subprocess.Popen[str]


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def embedded_service(home: Path) -> Iterator[Service]:
    """Start `qadistill run` with its state in `home`, wait until it is ready, and Ctrl-C it on exit.

    Job specs may name model folders under the system's temp folder (where the tests' tiny models live).
    """
    port = free_port()
    env = {
        **os.environ,
        "QADISTILL_HOME": str(home),
        "QADISTILL_PORT": str(port),
        "QADISTILL_MODEL_DIRS": json.dumps([tempfile.gettempdir()]),
        "OMP_NUM_THREADS": "1",
    }
    log = (home.parent / f"{home.name}-service.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-c", "from app.cli import main; main()", "run"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first.startswith("API key: "), f"{first!r}; log: {log.name}"
        # Drain the rest: a full pipe would block the service (and the worker, which shares its stdout).
        threading.Thread(target=_copy, args=(process.stdout, log), daemon=True).start()
        service = Service(f"http://127.0.0.1:{port}", first.removeprefix("API key: ").strip(), home, process)
        _wait_ready(service)
        yield service
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        log.close()


def _copy(source: IO[str], sink: IO[str]) -> None:
    try:
        for line in source:
            sink.write(line)
    except ValueError:  # the log was closed: the service is stopping
        pass


def _wait_ready(service: Service) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        assert service.process.poll() is None, "the service exited before it was ready"
        try:
            if httpx.get(f"{service.url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError("the embedded service did not become ready")
