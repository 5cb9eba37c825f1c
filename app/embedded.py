"""Embedded mode (`qadistill run`): one machine, no servers; a real Celery worker process beside the API."""

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from app.db.migrate import upgrade_database
from app.db.session import session_scope
from app.logs import configure_logging
from app.services.auth import authenticate, create_api_key, get_or_create_tenant
from app.services.demo import seed_demo_dataset
from app.services.routing import embedded_queues
from app.settings import Settings
from app.storage import ArtifactStore

log = logging.getLogger(__name__)

DEMO_TENANT = "demo"
KEY_FILE = "api-key"
REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER_STOP_TIMEOUT_S = 20.0


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment variables that give a child process exactly these settings."""
    assert settings.cache_dir is not None and settings.work_dir is not None
    return {
        "QADISTILL_ENVIRONMENT": settings.environment,
        "QADISTILL_HOME": str(settings.home.resolve()),
        "QADISTILL_DATABASE_URL": settings.database_url,
        "QADISTILL_BROKER_URL": settings.broker_url,
        "QADISTILL_BROKER_KEY_PREFIX": settings.broker_key_prefix,
        "QADISTILL_ARTIFACTS_URL": settings.artifacts_url,
        "QADISTILL_CACHE_DIR": str(settings.cache_dir.resolve()),
        "QADISTILL_WORK_DIR": str(settings.work_dir.resolve()),
        "QADISTILL_LEASE_S": str(settings.lease_s),
        "QADISTILL_MAX_TAKEOVERS": str(settings.max_takeovers),
        "QADISTILL_REQUEUE_AFTER_S": str(settings.requeue_after_s),
        "QADISTILL_CHECKPOINT_SYNC_S": str(settings.checkpoint_sync_s),
        **({"QADISTILL_STUDENT_PROCESSES": str(settings.student_processes)} if settings.student_processes else {}),
        "QADISTILL_RETRY_MAX_S": str(settings.retry_max_s),
        "QADISTILL_WORKER_METRICS_PORT": str(settings.worker_metrics_port),
        "QADISTILL_LOG_LEVEL": settings.log_level,
        "QADISTILL_LOG_FORMAT": settings.log_format,
    }


def worker_command(queues: str, concurrency: int = 1, pool: str = "prefork") -> list[str]:
    """The command line of a Celery worker process on this interpreter."""
    return [
        sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
        "-Q", queues, "-c", str(concurrency), "--pool", pool, "-l", "info",
        # One worker needs no cluster chatter, and starts a second or two sooner without it.
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip


def start_worker(
    settings: Settings,
    *,
    pool: str = "prefork",
    log_path: Path | None = None,
    extra_env: dict[str, str] | None = None,
    queues: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start a Celery worker process with `settings` consuming `queues` (default: embedded_queues()), its output
    to `log_path`, else inherited."""
    env = {**os.environ, **settings_env(settings), **(extra_env or {})}
    out = log_path.open("ab") if log_path else None
    command = worker_command(queues or embedded_queues(), concurrency=settings.worker_concurrency, pool=pool)
    # A session of its own: stop_worker can then end the pool processes too, not only their parent.
    return subprocess.Popen(
        command,
        env=env,
        cwd=REPO_ROOT,
        stdout=out,
        stderr=subprocess.STDOUT if out else None,
        start_new_session=True,
    )


def stop_worker(process: subprocess.Popen[bytes], timeout: float = WORKER_STOP_TIMEOUT_S) -> None:
    """Ask the worker to stop (warm shutdown), and kill it if it has not within `timeout` seconds."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        # Its unfinished task is not acknowledged: the broker hands it out again at the next start.
        log.warning("worker %d did not stop in %.0f s: killing it", process.pid, timeout)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def prepare_demo(settings: Settings) -> str:
    """Migrate, seed dataset `demo` for tenant `demo`, and return its API key (kept in the home folder)."""
    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade_database(settings.database_url)
    key_file = settings.home / KEY_FILE
    store = ArtifactStore(settings.artifacts_url)
    with session_scope(settings.database_url) as session:
        tenant = get_or_create_tenant(session, name=DEMO_TENANT)
        seed_demo_dataset(session, store, tenant=tenant)
        if key_file.exists():
            token = key_file.read_text().strip()
            owner = authenticate(session, token)
            if owner is not None and owner.id == tenant.id:
                return token
        _, token = create_api_key(session, tenant=tenant)
    key_file.write_text(token + "\n")
    key_file.chmod(0o600)
    return token


def run_embedded(settings: Settings) -> None:
    """Start the API on settings.host:port and a worker process; stop the worker when the API stops."""
    import uvicorn

    from app.main import create_app

    configure_logging(process="api", level=settings.log_level, fmt=settings.log_format)
    token = prepare_demo(settings)
    print(f"API key: {token}", flush=True)
    worker = start_worker(settings)
    threading.Thread(target=_report_worker_exit, args=(worker,), daemon=True).start()
    # uvicorn shuts down gracefully on SIGTERM and then raises the signal again: turn that into an exception,
    # not a silent death, so that the worker is stopped below.
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=None)
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop_worker(worker)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _report_worker_exit(worker: subprocess.Popen[bytes]) -> None:
    # Without a worker, jobs stay queued: say so loudly rather than leave the user waiting.
    code = worker.wait()
    if code not in (0, -signal.SIGTERM, -signal.SIGINT):
        log.error("the worker process exited with status %s: jobs will stay queued; see its output above", code)
