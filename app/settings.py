"""Every knob of the service in one place, read from the environment with the QADISTILL_ prefix."""

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Service settings; the defaults are embedded mode (SQLite, no broker server, local artifacts)."""

    model_config = SettingsConfigDict(env_prefix="QADISTILL_", env_file=".env", extra="ignore")

    environment: str = Field("development", description="'development' or 'production'.")
    home: Path = Field(Path(".qadistill"), description="Folder for embedded-mode state.")
    database_url: str = ""
    broker_url: str = ""
    artifacts_url: str = ""
    cache_dir: Path | None = Field(None, description="Soft-label and pretrained-model cache.")
    work_dir: Path | None = Field(None, description="Workers' per-job folders (checkpoints to resume from).")
    broker_key_prefix: str = Field("", description="Prefix of every broker key (Redis), to share one server.")

    model_dirs: list[Path] = Field(
        default_factory=list,
        description="Server folders a job spec may name as a teacher path or base, or a student init_from; "
        "any other folder is refused, so one tenant cannot read the server's files.",
    )

    host: str = "127.0.0.1"
    port: int = 8000
    worker_concurrency: int = 1
    student_processes: int | None = Field(
        None,
        ge=1,
        description="On a CPU, the child processes a job's students train in side by side, one variant or more "
        "each (1: all in the job's process). Unset: one per thread torch uses, when the students have 200 steps "
        "or more.",
    )

    # Upload and request limits.
    max_upload_bytes: int = 50 * 1024 * 1024
    max_request_bytes: int = 1024 * 1024
    max_passages: int = 100
    max_passage_chars: int = 4000
    max_question_chars: int = 1000

    # Leases, reconciliation and retries (see workers/lease.py and app/services/leases.py).
    lease_s: float = Field(
        30.0,
        gt=0,
        description="Seconds a running job's lease lasts without a heartbeat; its worker renews it every third "
        "of this. A job whose lease expired is taken over by another worker within two lease periods.",
    )
    max_takeovers: int = Field(3, ge=0, description="Takeovers after lost workers before a job fails worker_lost.")
    requeue_after_s: float = Field(
        300.0,
        gt=0,
        description="Seconds a job may stay queued before its task is sent again, in case the broker lost it.",
    )
    checkpoint_sync_s: float = Field(
        60.0,
        ge=0,
        description="Seconds between copies of a running job's checkpoints to the artifact store (0: at every "
        "step that changed them); a job taken over resumes from the last copy.",
    )
    retry_max_s: float = Field(
        120.0,
        ge=0,
        description="Seconds a worker retries a database or broker call that failed for want of the server.",
    )
    api_retry_max_s: float = Field(
        2.0, ge=0, description="Seconds the API retries reaching the database before answering 503."
    )

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Least level logged.")
    log_format: Literal["json", "text"] = Field(
        "json", description="Log lines of the api and workers: one JSON object each (with request_id) or text."
    )
    worker_metrics_port: int = Field(
        9101,
        ge=0,
        le=65535,
        description="Port of a worker's Prometheus metrics (jobs, stages, queue depth, heartbeat); 0: none. A "
        "second worker on one host finds it taken and serves none: give each its own.",
    )
    metrics_key: str = Field(
        "",
        description="A Bearer token that makes /metrics add metrics by model name and version (which name "
        "tenants' models); without it /metrics shows aggregates only. Empty: never shown.",
    )

    # Quotas.
    max_active_jobs: int = Field(
        4, ge=1, description="Jobs one tenant may have queued or running at once; beyond it, 429 with Retry-After."
    )

    # Serving.
    serve_max_batch_pairs: int = 512
    serve_max_wait_ms: float = 5.0
    serve_max_queue: int = 512
    serve_max_inflight_batches: int = Field(2, ge=1, description="Batches of one model scored at once.")
    serve_cache_bytes: int = 2 * 1024**3
    serve_download_cache_bytes: int = Field(
        10 * 1024**3,
        ge=0,
        description="Bytes on the API's disk for model folders fetched from a remote (S3) artifact store; the "
        "least recently used are removed beyond it (the one being loaded is kept).",
    )
    serve_threads: int = 0
    serve_device: str = Field("auto", description="'auto' (CUDA when visible), 'cpu' or 'cuda' (fp16).")
    serve_lookup_ttl_s: float = Field(
        2.0,
        ge=0,
        description="Seconds the answering path trusts an API key and model reference it resolved (0: never): "
        "an alias moved or a key revoked through another process takes effect within this time.",
    )

    rerank_model: str | None = Field(
        None,
        description="The model (`name`, `name@alias` or `name:version`) that text-embeddings-inference's "
        "`POST /rerank` ranks with, resolved for the calling key's tenant; also Cohere's `/v1/rerank` when a "
        "request names no model. Unset: `/rerank` answers 424.",
    )

    @model_validator(mode="after")
    def fill_embedded_defaults(self) -> "Settings":
        """Derive embedded-mode URLs under `home`; production must set them explicitly."""
        home = self.home.resolve()
        if self.environment == "production":
            missing = [n for n in ("database_url", "broker_url", "artifacts_url") if not getattr(self, n)]
            if missing:
                raise ValueError(f"production needs QADISTILL_{missing[0].upper()} to be set")
        self.database_url = self.database_url or f"sqlite:///{home / 'qadistill.db'}"
        self.broker_url = self.broker_url or f"sqla+sqlite:///{home / 'broker.db'}"
        self.artifacts_url = self.artifacts_url or str(home / "artifacts")
        self.cache_dir = self.cache_dir or home / "cache"
        self.work_dir = self.work_dir or home / "work"
        return self


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
