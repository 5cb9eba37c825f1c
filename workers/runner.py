"""Run one job: fetch its datasets, call run_pipeline with database-backed hooks, register the model.

torch and the pipeline are imported inside `execute_job`, so a prefork parent never loads them (nor CUDA).
"""

import logging
import math
import shutil
import time
from typing import TYPE_CHECKING, Any

from app.db.session import session_scope
from app.services import job_runs, jobs
from app.services.registry import register_version
from app.settings import Settings
from app.storage import ArtifactStore

if TYPE_CHECKING:
    from app.distill.hooks import Hooks, Progress

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 1.0
CANCEL_POLL_S = 1.0


class JobReporter:
    """The pipeline's hooks for one job: progress and curve points throttled into the database."""

    def __init__(self, database_url: str, job_id: str) -> None:
        self.database_url = database_url
        self.job_id = job_id
        self.stage = "prepare"
        self.fraction = 0.0
        self.points: list[tuple[str, int, str, float]] = []
        self.last_flush = 0.0
        self.last_cancel_check = 0.0
        self.cancel_cached = False

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

    def on_event(self, stage: str, message: str) -> None:
        """Store a milestone at once (they are few)."""
        log.info("job %s [%s] %s", self.job_id, stage, message)
        with session_scope(self.database_url) as session:
            job_runs.add_event(session, job_id=self.job_id, stage=stage, message=message)

    def should_cancel(self) -> bool:
        """Whether the job was asked to stop; reads the database at most once a second."""
        now = time.monotonic()
        if not self.cancel_cached and now - self.last_cancel_check >= CANCEL_POLL_S:
            self.last_cancel_check = now
            with session_scope(self.database_url) as session:
                self.cancel_cached = job_runs.cancel_requested(session, job_id=self.job_id)
        return self.cancel_cached

    def flush(self) -> None:
        """Write the buffered stage, progress and points."""
        points, self.points = self.points, []
        with session_scope(self.database_url) as session:
            job_runs.record_progress(
                session, job_id=self.job_id, stage=self.stage, progress=self.fraction, points=points
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


def execute_job(job_id: str, settings: Settings) -> str:
    """Run job `job_id` to a final status and return it; a finished job returns at once (redelivery)."""
    from app.distill.data import DataError, read_pairs
    from app.distill.hooks import Cancelled
    from app.distill.pipeline import run_pipeline
    from app.distill.pretrained import ModelNotInstalledError, UnknownModelError
    from app.distill.spec import PipelineSpec
    from app.serving.optimize import optimize_for_serving

    url = settings.database_url
    with session_scope(url) as session:
        job = job_runs.claim_job(session, job_id=job_id)
        if job is None:
            return "skipped"
        tenant_id, spec_data = job.tenant_id, dict(job.spec)
        datasets = job_runs.job_datasets(session, job_id=job_id)

    store = ArtifactStore(settings.artifacts_url)
    assert settings.cache_dir is not None and settings.work_dir is not None
    reporter = JobReporter(url, job_id)
    names_by_path: dict[str, str] = {}
    try:
        paths: dict[str, str] = {}
        for role, dataset in datasets.items():
            local = store.local_file(dataset.artifact_uri, settings.cache_dir)
            paths[role] = str(local)
            names_by_path[str(local)] = f"data.{role}"
        spec = PipelineSpec.model_validate({**spec_data, "data": {**spec_data["data"], **jobs.spec_data(paths)}})
        eval_names = jobs.spec_data({role: dataset.name for role, dataset in datasets.items()})["eval"]
        result = run_pipeline(
            spec,
            out_dir=settings.work_dir / job_id,
            cache_dir=settings.cache_dir,
            hooks=reporter.hooks(),
            eval_names=eval_names,
        )
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
        uri = store.put_dir(result.model_dir, f"{tenant_id}/models/{job_id}")
        report = json_finite(result.metrics | {"serving": serving})
        with session_scope(url) as session:
            version = register_version(
                session, tenant_id=tenant_id, name=spec.name, job_id=job_id, artifact_uri=uri, metrics=report
            )
            job_runs.finish_job(
                session,
                job_id=job_id,
                status="succeeded",
                message=f"registered {version.name}:{version.version}",
                report=report,
            )
        return "succeeded"
    except Cancelled:
        return _end(url, job_id, reporter, "cancelled", "stopped at the user's request")
    except DataError as err:
        param = names_by_path.get(err.file)
        where = f"line {err.line}, field '{err.field}': " if err.line else ""
        return _end(url, job_id, reporter, "failed", f"{param}: {where}{err.message}", "invalid_data", param)
    except UnknownModelError as err:
        return _end(url, job_id, reporter, "failed", str(err), "unknown_model")
    except ModelNotInstalledError as err:
        return _end(url, job_id, reporter, "failed", str(err), "model_not_installed")
    except Exception as err:
        log.exception("job %s failed", job_id)
        return _end(url, job_id, reporter, "failed", f"{type(err).__name__}: {err}", "pipeline_error")
    finally:
        # Checkpoints only serve a redelivered task; a job that reached a final status never runs again.
        shutil.rmtree(settings.work_dir / job_id, ignore_errors=True)


def _end(
    url: str,
    job_id: str,
    reporter: JobReporter,
    status: str,
    message: str,
    code: str | None = None,
    param: str | None = None,
) -> str:
    reporter.flush()
    with session_scope(url) as session:
        job_runs.finish_job(session, job_id=job_id, status=status, message=message, error_code=code, error_param=param)
    log.info("job %s %s: %s", job_id, status, message)
    return status
