"""Private PostgreSQL and Redis servers that a test starts, stops and restarts without touching the shared ones.

PostgreSQL: a cluster made with initdb in a temp folder, on a free port. initdb and the server refuse to run
as root, so as root they run as the `postgres` system user (runuser), in a folder that user owns.
Redis: a redis-server without persistence (`--save "" --appendonly no`), as `.ci/run` starts it: a restart
loses every message it held.
"""

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START_TIMEOUT_S = 30.0


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, timeout: float, *, up: bool) -> None:
    """Wait until 127.0.0.1:`port` accepts connections (up) or refuses them (not up)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                accepting = True
        except OSError:
            accepting = False
        if accepting == up:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"port {port} still {'closed' if up else 'open'} after {timeout:.0f} s")
        time.sleep(0.1)


def postgres_bin() -> Path:
    """The newest installed PostgreSQL's bin folder (Debian layout)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        raise FileNotFoundError("no /usr/lib/postgresql/*/bin/pg_ctl: PostgreSQL server binaries not installed")
    return Path(found[-1]).parent


class PrivatePostgres:
    """A throw-away PostgreSQL cluster (trust auth, user `postgres`, fsync off) on a free port."""

    def __init__(self) -> None:
        self.bin = postgres_bin()
        self.port = free_port()
        # Not pytest's tmp_path: its folders are root's, mode 700, and the server may run as another user.
        self.root = Path(tempfile.mkdtemp(prefix="qadistill-pg-"))
        self.data = self.root / "data"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.root, user="postgres", group="postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self._run(self.bin / "initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of its `postgres` database."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(self.bin / "pg_ctl", "-D", self.data, "-o", options, "-l", self.root / "server.log", "-w",
                  "-t", str(int(START_TIMEOUT_S)), "start")  # fmt: skip

    def stop(self) -> None:
        """Stop the server at once (fast mode: clients are disconnected, as in a restart)."""
        if (self.data / "postmaster.pid").exists():
            self._run(self.bin / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        """Stop the server and delete the cluster."""
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def _run(self, *args: object) -> None:
        subprocess.run([*self.as_user, *map(str, args)], check=True, capture_output=True, timeout=START_TIMEOUT_S + 30)


class PrivateRedis:
    """A redis-server without persistence on a free port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="qadistill-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Its URL, database 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                   "no", "--dir", str(self.root)]  # fmt: skip
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 (the server keeps writing to it)
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for_port(self.port, START_TIMEOUT_S, up=True)

    def stop(self) -> None:
        """Kill the server (what it held in memory is lost)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None
        wait_for_port(self.port, START_TIMEOUT_S, up=False)

    def remove(self) -> None:
        """Stop the server and delete its folder."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class MotoS3:
    """moto's S3-compatible HTTP server (`python -m moto.server`) on a free port, holding everything in memory."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        """The variables that point botocore (and so s3fs) at it, with throw-away credentials."""
        return {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}",
            "AWS_ACCESS_KEY_ID": "qadistill-test",
            "AWS_SECRET_ACCESS_KEY": "qadistill-test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, START_TIMEOUT_S, up=True)

    def stop(self) -> None:
        """Stop the server (its buckets are gone)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
