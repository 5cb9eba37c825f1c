"""Run one job under a lease: fetch its datasets, call run_pipeline with database-backed hooks, register the model.

A job whose teachers need training runs as three steps, each a Celery task: `execute_job` (prepare: claim the
run's lease, check the data, send the teachers as a group), `execute_teacher` once per teacher (on as many
workers as are free; the last to finish sends the next step) and `execute_finish` (the teachers' folders
from the artifact store, then soft labels, student stages, evaluation and registration by run_pipeline,
which finds the teachers trained). A job with none to train runs whole in `execute_job`.

torch and the pipeline are imported inside the steps, so a prefork parent never loads them (nor CUDA).
"""

import importlib
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from celery import Celery
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy.orm import Session

from app.db.models import FINISHED_STATUSES, Dataset, Job
from app.db.retry import is_transient, with_db_retry
from app.db.session import session_scope
from app.services import job_runs, jobs
from app.services.job_runs import Lease, LeaseLost
from app.services.queue import enqueue_finish, enqueue_teachers, make_celery
from app.services.registry import register_version
from app.services.routing import live_workers, route_job
from app.settings import Settings
from app.storage import ArtifactStore
from workers.cache_mirror import CacheMirror
from workers.lease import LeaseKeeper
from workers.metrics import observe_stage
from workers.workspace import CURRENT, Workspace, discard_snapshots, teacher_key, workspace_key

if TYPE_CHECKING:
    from app.distill.hooks import Hooks, Progress
    from app.distill.spec import PipelineSpec

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 1.0
CANCEL_POLL_S = 1.0
RESTORED = "restored the checkpoints of the previous run from the artifact store"
TEACHERS_SHARE = 0.5
"""The part of a job's progress bar its teachers' tasks fill (the finishing step's own count takes over)."""

T = TypeVar("T")


class JobReporter:
    """The pipeline's hooks for one job: progress and curve points throttled into the database, each write
    fenced by the job's lease and retried while the database is unreachable; checkpoints copied to the store."""

    def __init__(self, settings: Settings, lease: Lease, keeper: LeaseKeeper, workspace: Workspace | None) -> None:
        self.database_url = settings.database_url
        self.retry_max_s = settings.retry_max_s
        self.checkpoint_sync_s = settings.checkpoint_sync_s
        self.job_id = lease.job_id
        self.lease, self.keeper, self.workspace = lease, keeper, workspace
        self.stage = "prepare"
        # When each stage reported first, until it reports its last step: stages may run side by side.
        self.stage_started: dict[str, float] = {}
        self.cache_mirror: CacheMirror | None = None
        self.fraction = 0.0
        self.points: list[tuple[str, int, str, float]] = []
        self.last_flush = 0.0
        self.last_cancel_check = 0.0
        self.cancel_cached = False

    def write(self, write: Callable[[Session], T]) -> T:
        """Run `write` in a session, fenced by the lease and retried while the database is unreachable."""

        def attempt() -> T:
            self.keeper.check()
            with session_scope(self.database_url) as session:
                return write(session)

        return with_db_retry(attempt, max_s=self.retry_max_s, give_up=self.keeper.lost)

    def sync_workspace(self) -> None:
        """Copy the checkpoints to the store when due (this step may have none)."""
        if self.workspace is not None:
            self.workspace.maybe_sync()

    def on_progress(self, progress: "Progress") -> None:
        """Buffer the point; write at most once a second, and at once when the stage changes."""
        values = dict(progress.metrics)
        if progress.loss is not None:
            values["loss"] = progress.loss
        self.points += [
            (progress.stage, progress.step, name, float(v)) for name, v in values.items() if math.isfinite(v)
        ]
        self.stage_started.setdefault(progress.stage, time.monotonic())
        if progress.step >= progress.total:
            self.end_stage(progress.stage)
        changed = progress.stage != self.stage
        self.stage, self.fraction = progress.stage, progress.fraction
        if changed or time.monotonic() - self.last_flush >= FLUSH_INTERVAL_S:
            self.flush()

    def on_event(self, stage: str, message: str) -> None:
        """Store a milestone at once (they are few)."""
        log.info("job %s [%s] %s", self.job_id, stage, message, extra={"job_id": self.job_id, "stage": stage})
        self.write(lambda s: job_runs.add_event(s, job_id=self.job_id, stage=stage, message=message, lease=self.lease))
        if stage == "soft_labels" and self.cache_mirror is not None:  # soft labels or embeddings are ready
            self.cache_mirror.push()

    def end_stage(self, stage: str) -> None:
        """Time a stage that reported its last step, once (workers/metrics.py)."""
        started = self.stage_started.pop(stage, None)
        if started is not None:
            observe_stage(stage, time.monotonic() - started)

    def end_stages(self) -> None:
        """Time the stages the run leaves unfinished (it failed, was cancelled or lost its lease)."""
        for stage in list(self.stage_started):
            self.end_stage(stage)

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

        return Hooks(
            on_progress=self.on_progress,
            on_event=self.on_event,
            should_cancel=self.should_cancel,
            # The run's files are whole at a safe point: the moment to copy its checkpoints to the store.
            on_safe_point=self.sync_workspace,
            safe_point_every_s=self.checkpoint_sync_s,
        )


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


def load_pipeline() -> None:
    """Import the pipeline (torch, transformers) before any part of it. A pool process may be importing it in
    the background (workers/celery_app.py), and transformers' lazy modules break when two threads import them
    at once: importing that same module first waits for the background import to end."""
    importlib.import_module("app.distill.pipeline")


def teachers_to_train(spec: "PipelineSpec") -> list[str]:
    """The teachers that need fine-tuning (not ready-made, not a bi-encoder used zero-shot, not a soup of
    others: the finishing step averages those), as prepare_teacher decides."""
    return [t.name for t in spec.teachers if t.path is None and t.average_of is None and not t.zero_shot]


class _Run:
    """What one step of a job works with: its spec and data files, lease, heartbeat and reporter."""

    def __init__(
        self,
        settings: Settings,
        *,
        tenant_id: str,
        spec_data: dict[str, Any],
        datasets: dict[str, Dataset],
        lease: Lease,
        workspace_key: str | None,
        local: Path | None = None,
    ) -> None:
        self.settings, self.tenant_id, self.spec_data, self.datasets = settings, tenant_id, spec_data, datasets
        self.lease = lease
        self.store = ArtifactStore(settings.artifacts_url)
        self.keeper = LeaseKeeper(settings.database_url, lease, settings.lease_s)
        self.workspace = None
        if workspace_key is not None:
            assert local is not None
            self.workspace = Workspace(
                self.store,
                key=workspace_key,
                local=local,
                epoch=lease.epoch,
                every_s=settings.checkpoint_sync_s,
                still_leased=self.keeper.check,
            )
        self.reporter = JobReporter(settings, lease, self.keeper, self.workspace)
        self.names_by_path: dict[str, str] = {}

    def spec(self) -> "PipelineSpec":
        """The job's spec with its data sets as local files (downloaded from the store when remote)."""
        from app.distill.spec import PipelineSpec

        assert self.settings.cache_dir is not None
        paths: dict[str, str] = {}
        for role, dataset in self.datasets.items():
            local = self.store.local_file(dataset.artifact_uri, self.settings.cache_dir)
            paths[role] = str(local)
            self.names_by_path[str(local)] = f"data.{role}"
        data = {**self.spec_data["data"], **jobs.spec_data(paths)}
        return PipelineSpec.model_validate({**self.spec_data, "data": data})

    def run(self, body: Callable[[], str]) -> str:
        """`body()` under the lease's heartbeat; an error ends the job with what the user can act on."""
        from app.distill.data import DataError
        from app.distill.hooks import Cancelled
        from app.distill.pretrained import ModelNotInstalledError, UnknownModelError

        reporter, job_id = self.reporter, self.lease.job_id
        outcome = "interrupted"
        self.keeper.start()
        try:
            outcome = body()
        except LeaseLost:
            outcome = "lease_lost"
        except Cancelled:
            if self.keeper.lost.is_set():
                outcome = "lease_lost"
            else:
                outcome = _end(reporter, "cancelled", "stopped at the user's request")
        except DataError as err:
            param = self.names_by_path.get(err.file)
            where = f"line {err.line}, field '{err.field}': " if err.line else ""
            outcome = _end(reporter, "failed", f"{param}: {where}{err.message}", "invalid_data", param)
        except UnknownModelError as err:
            outcome = _end(reporter, "failed", str(err), "unknown_model")
        except ModelNotInstalledError as err:
            outcome = _end(reporter, "failed", str(err), "model_not_installed")
        except Exception as err:
            if is_transient(err):
                log.warning("job %s: database unreachable for %.0f s; leaving it to be taken over", job_id,
                            self.settings.retry_max_s)  # fmt: skip
            else:
                log.exception("job %s failed", job_id)
                outcome = _end(reporter, "failed", f"{type(err).__name__}: {err}", "pipeline_error")
        finally:
            self.keeper.stop()
            reporter.end_stages()
            if self.workspace is not None:
                self.workspace.discard_local()
        if outcome in FINISHED_STATUSES:
            # A job that reached a final status never runs again: its snapshots can go.
            discard_snapshots(self.store, tenant_id=self.tenant_id, job_id=job_id)
        if outcome == "lease_lost":
            log.warning("job %s: lease %d lost to another worker; this run stopped writing", job_id, self.lease.epoch)
        return outcome


def execute_job(job_id: str, settings: Settings, celery: Celery | None = None) -> str:
    """Claim job `job_id` for a new run and start it: whole here when no teacher needs training, else
    send its teachers as a group of tasks. Returns the outcome.

    'skipped' when it must not run here (finished, or leased by a live worker: a duplicate delivery);
    'teachers_sent' when its teachers went to the broker; 'lease_lost' when another worker took it over
    meanwhile; 'interrupted' when the database stayed unreachable past settings.retry_max_s (its lease then
    expires and a worker takes it over). `celery` sends the teachers (default: an app on the settings' broker).
    """
    load_pipeline()
    celery = celery or make_celery(settings)

    def claim() -> tuple[str, dict[str, Any], dict[str, Dataset], Lease, str] | None:
        with session_scope(settings.database_url) as session:
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
            # The run's next tasks go to the job's queue; a job from before queues gets one now.
            queue = job.queue or route_job(session, job, live_workers(session, lease_s=settings.lease_s))
            return job.tenant_id, dict(job.spec), job_runs.job_datasets(session, job_id=job_id), lease, queue

    claimed = with_db_retry(claim, max_s=settings.retry_max_s)
    if claimed is None:
        return "skipped"
    tenant_id, spec_data, datasets, lease, queue = claimed
    run = _Run(settings, tenant_id=tenant_id, spec_data=spec_data, datasets=datasets, lease=lease, workspace_key=None)

    def prepare() -> str:
        from app.distill.data import read_pairs

        spec = run.spec()
        teachers = teachers_to_train(spec)
        if not teachers:
            return ""
        read_pairs(spec.data.train, labelled=True)  # bad data fails the job now, not in each teacher's task
        run.reporter.on_event("prepare", f"teachers {', '.join(teachers)} sent as {len(teachers)} parallel tasks")
        run.keeper.stop()
        run.reporter.write(lambda s: job_runs.hand_to_queue(s, lease=lease, hold_s=_queue_hold_s(settings)))
        _send(lambda: enqueue_teachers(celery, job_id, lease.epoch, teachers, queue), job_id)
        return "teachers_sent"

    outcome = run.run(prepare)
    if outcome:
        return outcome
    return _finish(settings, tenant_id=tenant_id, spec_data=spec_data, datasets=datasets, lease=lease)


def execute_teacher(job_id: str, epoch: int, name: str, teachers: list[str], settings: Settings, celery: Celery) -> str:
    """Train teacher `name` of run `epoch` of the job under a task lease, its checkpoints in the store;
    the last of `teachers` to finish sends the run's last step. 'skipped' when it must not run here."""
    load_pipeline()
    from app.distill.data import read_pairs
    from app.distill.devices import resolve_device
    from app.distill.hooks import Cancelled, Hooks, Progress
    from app.distill.teachers import prepare_teacher

    def claim() -> tuple[str, dict[str, Any], dict[str, Dataset], Lease, bool, str] | None:
        with session_scope(settings.database_url) as session:
            claimed = job_runs.claim_task(
                session, job_id=job_id, epoch=epoch, task=f"teacher:{name}", worker=worker_name(),
                lease_s=settings.lease_s,
            )  # fmt: skip
            if claimed is None:
                return None
            job, lease = claimed
            datasets = job_runs.job_datasets(session, job_id=job_id)
            queue = job.queue or route_job(session, job, live_workers(session, lease_s=settings.lease_s))
            return job.tenant_id, dict(job.spec), datasets, lease, job.cancel_requested, queue

    claimed = with_db_retry(claim, max_s=settings.retry_max_s)
    if claimed is None:
        return "skipped"
    tenant_id, spec_data, datasets, lease, cancel, queue = claimed
    assert settings.work_dir is not None
    run = _Run(
        settings,
        tenant_id=tenant_id,
        spec_data=spec_data,
        datasets=datasets,
        lease=lease,
        workspace_key=teacher_key(tenant_id, job_id, name),
        local=settings.work_dir / job_id / f"teacher-{name}-lease-{epoch}",
    )
    reporter, workspace = run.reporter, run.workspace
    assert workspace is not None

    def on_progress(progress: Progress) -> None:
        progress.fraction = TEACHERS_SHARE * progress.step / max(1, progress.total)
        reporter.on_progress(progress)

    def train() -> str:
        if cancel:
            raise Cancelled()
        stage = f"teacher:{name}"
        if workspace.restore():
            reporter.on_event(stage, RESTORED)
        spec = run.spec()
        (teacher,) = [t for t in spec.teachers if t.name == name]
        prepare_teacher(
            teacher,
            train_pairs=read_pairs(spec.data.train, labelled=True).pairs,
            out_dir=workspace.local,
            cache_dir=settings.cache_dir,
            device=resolve_device(spec.device),
            hooks=Hooks(
                on_progress=on_progress,
                on_event=reporter.on_event,
                should_cancel=reporter.should_cancel,
                on_safe_point=reporter.sync_workspace,
            ),
            checkpoint_every=spec.checkpoint_every,
        )
        workspace.sync()
        reporter.flush()
        hold_s = _queue_hold_s(settings)
        if reporter.write(lambda s: job_runs.finish_task(s, lease=lease, tasks=teacher_tasks, hold_s=hold_s)):
            _send(lambda: enqueue_finish(celery, job_id, epoch, queue), job_id)
        return "trained"

    teacher_tasks = [f"teacher:{t}" for t in teachers]
    return run.run(train)


def execute_finish(job_id: str, epoch: int, settings: Settings) -> str:
    """Run the rest of run `epoch` of the job once its teachers are trained; 'skipped' when it must not
    run here (another run took the job over, it ended, or a duplicate of this step runs)."""
    load_pipeline()

    def claim() -> tuple[str, dict[str, Any], dict[str, Dataset], Lease] | None:
        with session_scope(settings.database_url) as session:
            lease = job_runs.take_from_queue(
                session, job_id=job_id, epoch=epoch, worker=worker_name(), lease_s=settings.lease_s
            )
            job = session.get(Job, job_id)
            if lease is None or job is None:
                return None
            return job.tenant_id, dict(job.spec), job_runs.job_datasets(session, job_id=job_id), lease

    claimed = with_db_retry(claim, max_s=settings.retry_max_s)
    if claimed is None:
        return "skipped"
    tenant_id, spec_data, datasets, lease = claimed
    return _finish(settings, tenant_id=tenant_id, spec_data=spec_data, datasets=datasets, lease=lease)


def _finish(
    settings: Settings,
    *,
    tenant_id: str,
    spec_data: dict[str, Any],
    datasets: dict[str, Dataset],
    lease: Lease,
) -> str:
    """run_pipeline in the job's workspace (teachers trained by their own tasks fetched from the store first),
    then register the model."""
    from app.distill.data import read_pairs
    from app.distill.pipeline import run_pipeline
    from app.serving.optimize import optimize_for_serving

    assert settings.cache_dir is not None and settings.work_dir is not None
    job_id = lease.job_id
    run = _Run(
        settings,
        tenant_id=tenant_id,
        spec_data=spec_data,
        datasets=datasets,
        lease=lease,
        workspace_key=workspace_key(tenant_id, job_id),
        local=settings.work_dir / job_id / f"lease-{lease.epoch}",
    )
    reporter, workspace, store = run.reporter, run.workspace, run.store
    assert workspace is not None

    def finish() -> str:
        if workspace.restore():
            reporter.on_event("prepare", RESTORED)
        spec = run.spec()
        for name in teachers_to_train(spec):
            _fetch_teacher(store, tenant_id, job_id, name, workspace.local)
        reporter.cache_mirror = CacheMirror(
            store, tenant_id=tenant_id, data_sha256={d.sha256 for d in datasets.values()}, cache_dir=settings.cache_dir
        )
        reporter.cache_mirror.pull()
        eval_names = jobs.spec_data({role: dataset.name for role, dataset in datasets.items()})["eval"]
        result = run_pipeline(
            spec,
            out_dir=workspace.local,
            cache_dir=settings.cache_dir,
            hooks=reporter.hooks(),
            eval_names=eval_names,
            processes=settings.student_processes,
        )
        workspace.sync()
        reporter.cache_mirror.push()
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
        run.keeper.check()
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
        return "succeeded"

    return run.run(finish)


def _fetch_teacher(store: ArtifactStore, tenant_id: str, job_id: str, name: str, out_dir: Path) -> None:
    """Copy teacher `name`, trained by its own task, from its stored snapshot to out_dir/teachers/<name>
    (where run_pipeline finds it trained), unless it is there already."""
    folder = out_dir / "teachers" / name
    key = teacher_key(tenant_id, job_id, name)
    current = store.read_text(store.uri(f"{key}/{CURRENT}"))
    if (folder / "config.json").is_file() or current is None:
        return
    stored = store.uri(f"{key}/{current.strip()}/teachers/{name}")
    if store.exists(stored):
        store.get_dir(stored, folder)


def _queue_hold_s(settings: Settings) -> float:
    """How long a run's next tasks may wait in the broker before the job is sent again."""
    return max(settings.lease_s, settings.requeue_after_s)


def _send(send: Callable[[], None], job_id: str) -> None:
    """Send the run's next tasks; a broker that stays unreachable leaves the job to the reconciliation sweep,
    which sends it again once the queue's hold on its lease runs out."""
    try:
        send()
    except BrokerError as exc:
        log.warning("job %s: could not send its next tasks (%s); the reconciliation sweep will", job_id, exc)


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
