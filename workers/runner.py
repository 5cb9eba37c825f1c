"""Run one job under a lease: fetch its datasets, call run_pipeline with database-backed hooks, register the model.

torch and the pipeline are imported inside `execute_job`, so a prefork parent never loads them (nor CUDA).
"""

import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from app.db.models import FINISHED_STATUSES, Dataset
from app.db.retry import is_transient, with_db_retry
from app.db.session import session_scope
from app.services import job_runs, jobs
from app.services.job_runs import Lease, LeaseLost
from app.services.registry import register_version
from app.settings import Settings
from app.storage import ArtifactStore
from workers.lease import LeaseKeeper
from workers.workspace import Workspace, discard_snapshots, workspace_key

if TYPE_CHECKING:
    from app.distill.hooks import Hooks, Progress

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 1.0
CANCEL_POLL_S = 1.0


class JobReporter:
    """The pipeline's hooks for one job: progress and curve points throttled into the database, each write
    fenced by the job's lease and retried while the database is unreachable; checkpoints copied to the store."""

    def __init__(self, settings: Settings, lease: Lease, keeper: LeaseKeeper, workspace: Workspace) -> None:
        self.database_url = settings.database_url
        self.retry_max_s = settings.retry_max_s
        self.job_id = lease.job_id
        self.lease, self.keeper, self.workspace = lease, keeper, workspace
        self.stage = "prepare"
        self.fraction = 0.0
        self.points: list[tuple[str, int, str, float]] = []
        self.last_flush = 0.0
        self.last_cancel_check = 0.0
        self.cancel_cached = False

    def write(self, write: Callable[[Session], None]) -> None:
        """Run `write` in a session, fenced by the lease and retried while the database is unreachable."""

        def attempt() -> None:
            self.keeper.check()
            with session_scope(self.database_url) as session:
                write(session)

        with_db_retry(attempt, max_s=self.retry_max_s, give_up=self.keeper.lost)

    def on_progress(self, progress: "Progress") -> None:
        """Buffer the point; write at most once a second, and at once when the stage changes."""
        values = dict(progress.metrics)
        if progress.loss is not None:
            values["loss"] = progress.loss
        self.points += [
            (progress.stage, progress.step, name, float(v)) for name, v in values.items() if math.isfinite(v)
        ]
        changed = progress.stage != self.stage
        self.stage, self.fraction = progress.stage, progress.fraction
        if changed or time.monotonic() - self.last_flush >= FLUSH_INTERVAL_S:
            self.flush()
        # Between two steps no checkpoint is half written: a safe moment to copy them.
        self.workspace.maybe_sync()

    def on_event(self, stage: str, message: str) -> None:
        """Store a milestone at once (they are few)."""
        log.info("job %s [%s] %s", self.job_id, stage, message)
        self.write(lambda s: job_runs.add_event(s, job_id=self.job_id, stage=stage, message=message, lease=self.lease))
        self.workspace.maybe_sync()

    def should_cancel(self) -> bool:
        """Whether the job was asked to stop or its lease was lost; reads the database at most once a second."""
        if self.keeper.lost.is_set():
            return True
        now = time.monotonic()
        if not self.cancel_cached and now - self.last_cancel_check >= CANCEL_POLL_S:
            self.last_cancel_check = now
            try:
                with session_scope(self.database_url) as session:
                    self.cancel_cached = job_runs.cancel_requested(session, job_id=self.job_id)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning("job %s: database unreachable, cancel flag not read: %s", self.job_id, exc)
        return self.cancel_cached

    def flush(self) -> None:
        """Write the buffered stage, progress and points."""
        points, self.points = self.points, []
        self.write(
            lambda s: job_runs.record_progress(
                s, job_id=self.job_id, stage=self.stage, progress=self.fraction, points=points, lease=self.lease
            )
        )
        self.last_flush = time.monotonic()

    def hooks(self) -> "Hooks":
        """The hooks to hand to run_pipeline."""
        from app.distill.hooks import Hooks

        return Hooks(on_progress=self.on_progress, on_event=self.on_event, should_cancel=self.should_cancel)


def json_finite(value: Any) -> Any:
    """`value` with NaN and infinities replaced by None, so it stores as JSON anywhere."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_finite(v) for v in value]
    return value


def worker_name() -> str:
    """This process's name as a lease holder: host, process id and a random part (process ids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def execute_job(job_id: str, settings: Settings) -> str:
    """Run job `job_id` under a lease to a final status and return it.

    'skipped' when it must not run here (finished, or leased by a live worker: a duplicate delivery);
    'lease_lost' when another worker took it over meanwhile; 'interrupted' when the database stayed
    unreachable past settings.retry_max_s (its lease then expires and a worker takes it over).
    """
    from app.distill.data import DataError, read_pairs
    from app.distill.hooks import Cancelled
    from app.distill.pipeline import run_pipeline
    from app.distill.pretrained import ModelNotInstalledError, UnknownModelError
    from app.distill.spec import PipelineSpec
    from app.serving.optimize import optimize_for_serving

    url = settings.database_url

    def claim() -> tuple[str, dict[str, Any], dict[str, Dataset], Lease] | None:
        with session_scope(url) as session:
            claimed = job_runs.claim_job(
                session,
                job_id=job_id,
                worker=worker_name(),
                lease_s=settings.lease_s,
                max_takeovers=settings.max_takeovers,
            )
            if claimed is None:
                return None
            job, lease = claimed
            return job.tenant_id, dict(job.spec), job_runs.job_datasets(session, job_id=job_id), lease

    claimed = with_db_retry(claim, max_s=settings.retry_max_s)
    if claimed is None:
        return "skipped"
    tenant_id, spec_data, datasets, lease = claimed
    store = ArtifactStore(settings.artifacts_url)
    assert settings.cache_dir is not None and settings.work_dir is not None
    keeper = LeaseKeeper(url, lease, settings.lease_s)
    keeper.start()
    workspace = Workspace(
        store,
        key=workspace_key(tenant_id, job_id),
        local=settings.work_dir / job_id / f"lease-{lease.epoch}",
        epoch=lease.epoch,
        every_s=settings.checkpoint_sync_s,
        still_leased=keeper.check,
    )
    reporter = JobReporter(settings, lease, keeper, workspace)
    names_by_path: dict[str, str] = {}
    outcome = "interrupted"
    try:
        if workspace.restore():
            reporter.on_event("prepare", "restored the checkpoints of the previous run from the artifact store")
        paths: dict[str, str] = {}
        for role, dataset in datasets.items():
            local = store.local_file(dataset.artifact_uri, settings.cache_dir)
            paths[role] = str(local)
            names_by_path[str(local)] = f"data.{role}"
        spec = PipelineSpec.model_validate({**spec_data, "data": {**spec_data["data"], **jobs.spec_data(paths)}})
        eval_names = jobs.spec_data({role: dataset.name for role, dataset in datasets.items()})["eval"]
        result = run_pipeline(
            spec,
            out_dir=workspace.local,
            cache_dir=settings.cache_dir,
            hooks=reporter.hooks(),
            eval_names=eval_names,
        )
        workspace.sync()
        # The fastest serving form that keeps MAP within bounds, chosen once here rather than at load time.
        serving = optimize_for_serving(
            result.model_dir, read_pairs(spec.data.eval[0]).pairs, threads=settings.serve_threads
        )
        reporter.on_event(
            "register",
            f"serving backend {serving['backend']}: {serving['ms_per_question']:.1f} ms per question, "
            f"MAP {serving['map_backend']:.4f} (fp32 {serving['map_fp32']:.4f})",
        )
        reporter.flush()
        keeper.check()
        uri = store.put_dir(result.model_dir, f"{tenant_id}/models/{job_id}")
        report = json_finite(result.metrics | {"serving": serving})

        def register(session: Session) -> None:
            job_runs.fence(session, lease)
            version = register_version(
                session, tenant_id=tenant_id, name=spec.name, job_id=job_id, artifact_uri=uri, metrics=report
            )
            message = f"registered {version.name}:{version.version}"
            job_runs.finish_job(session, job_id=job_id, status="succeeded", message=message, report=report, lease=lease)

        reporter.write(register)
        outcome = "succeeded"
    except LeaseLost:
        outcome = "lease_lost"
    except Cancelled:
        if keeper.lost.is_set():
            outcome = "lease_lost"
        else:
            outcome = _end(reporter, "cancelled", "stopped at the user's request")
    except DataError as err:
        param = names_by_path.get(err.file)
        where = f"line {err.line}, field '{err.field}': " if err.line else ""
        outcome = _end(reporter, "failed", f"{param}: {where}{err.message}", "invalid_data", param)
    except UnknownModelError as err:
        outcome = _end(reporter, "failed", str(err), "unknown_model")
    except ModelNotInstalledError as err:
        outcome = _end(reporter, "failed", str(err), "model_not_installed")
    except Exception as err:
        if is_transient(err):
            log.warning("job %s: database unreachable for %.0f s; leaving it to be taken over", job_id,
                        settings.retry_max_s)  # fmt: skip
        else:
            log.exception("job %s failed", job_id)
            outcome = _end(reporter, "failed", f"{type(err).__name__}: {err}", "pipeline_error")
    finally:
        keeper.stop()
        workspace.discard_local()
    if outcome in FINISHED_STATUSES:
        # A job that reached a final status never runs again: its snapshots can go.
        discard_snapshots(store, tenant_id=tenant_id, job_id=job_id)
    if outcome == "lease_lost":
        log.warning("job %s: lease %d lost to another worker; this run stopped writing", job_id, lease.epoch)
    return outcome


def _end(reporter: JobReporter, status: str, message: str, code: str | None = None, param: str | None = None) -> str:
    def finish(session: Session) -> None:
        job_runs.finish_job(
            session,
            job_id=reporter.job_id,
            status=status,
            message=message,
            error_code=code,
            error_param=param,
            lease=reporter.lease,
        )

    try:
        reporter.flush()
        reporter.write(finish)
    except LeaseLost:
        return "lease_lost"
    log.info("job %s %s: %s", reporter.job_id, status, message)
    return status
