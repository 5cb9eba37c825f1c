"""prometheus_client's multi-process mode for a worker: its pool processes write their metrics to files in one
folder (PROMETHEUS_MULTIPROC_DIR), which the worker's metrics port reads. The variable must be set before
prometheus_client is first imported, so this module imports nothing of the project."""

import atexit
import glob
import os
import shutil
import sys
import tempfile

VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "qadistill-worker-metrics-"


def use_multiprocess_dir() -> str | None:
    """Point PROMETHEUS_MULTIPROC_DIR at an empty folder for this worker (a new temporary one, removed at exit,
    unless the operator set one: then its old files are removed). None when prometheus_client is already loaded
    in this process (it then stays single-process)."""
    if "prometheus_client" in sys.modules:
        return None
    folder = os.environ.get(VARIABLE)
    if folder:
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(folder):  # a previous run's counters would be added to this one's
            if name.endswith(".db"):
                os.unlink(os.path.join(folder, name))
    else:
        parent = os.getpid()
        _remove_dead_workers_folders()
        folder = tempfile.mkdtemp(prefix=f"{PREFIX}{parent}-")
        os.environ[VARIABLE] = folder
        atexit.register(lambda: os.getpid() == parent and shutil.rmtree(folder, ignore_errors=True))
    return folder


def _remove_dead_workers_folders() -> None:
    # A worker killed outright (SIGKILL, OOM) leaves its folder behind: its name says whose it was.
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{PREFIX}*-*")):
        pid = os.path.basename(path).removeprefix(PREFIX).split("-", 1)[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(path, ignore_errors=True)
