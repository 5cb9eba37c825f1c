"""The `qadistill` command. Each sub-command is a thin shell over a library call."""

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from app.distill.spec import PipelineSpec

if TYPE_CHECKING:
    from app.client import Client, Job, JobEvent

# Help is rich markup: a literal "[default: ...]" needs a backslash before its "[", or it vanishes as a tag.
cli = typer.Typer(
    no_args_is_help=True, add_completion=False, help="Distil Q&A models and serve them."
)
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")]


@cli.command()
def distill(
    spec: Annotated[
        Path,
        typer.Argument(
            help="Pipeline spec, YAML or JSON. Relative data paths are looked up beside the spec file first."
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder; rerun with the same one to resume.")
    ],
    cache_dir: Annotated[
        Path | None,
        typer.Option(help="Soft-label and pretrained-model cache \\[default: the settings' cache_dir]."),
    ] = None,
) -> None:
    """Run a distillation pipeline (teachers, soft labels, stages 1 and 2, evaluation); print its report."""
    import signal

    from transformers.utils import logging as transformers_logging

    from app.distill.data import DataError
    from app.distill.hooks import Cancelled
    from app.distill.pipeline import format_report, run_pipeline
    from app.distill.pretrained import ModelNotInstalledError, UnknownModelError
    from app.distill.progress import ProgressBars
    from app.settings import get_settings

    pipeline_spec = _read_spec_file(spec)
    # Only this command's bars: a classifier's encoder loads without its head, which is expected, not news.
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    bars = ProgressBars()
    interrupted = False

    def stop_gracefully(signum: int, frame: object) -> None:
        nonlocal interrupted
        interrupted = True

    # Ctrl-C lets the training loop save a checkpoint first; rerunning the command resumes from it.
    previous_handler = signal.signal(signal.SIGINT, stop_gracefully)
    hooks = bars.hooks(should_cancel=lambda: interrupted)
    try:
        result = run_pipeline(
            pipeline_spec, out_dir=out, cache_dir=cache_dir or get_settings().cache_dir, hooks=hooks
        )
    except Cancelled as err:
        typer.echo(f"stopped: {err}; rerun the same command to resume", err=True)
        raise typer.Exit(130) from err
    except (DataError, UnknownModelError, ModelNotInstalledError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        bars.close()
    typer.echo(format_report(result.metrics))
    typer.echo(f"model: {result.model_dir}")


def _read_spec_file(path: Path) -> PipelineSpec:
    """Parse a YAML or JSON spec file; invalid content prints each error with its field path and exits 2."""
    import yaml
    from pydantic import ValidationError

    try:
        raw = yaml.safe_load(path.read_text())  # JSON is YAML too
    except (OSError, yaml.YAMLError) as err:
        typer.echo(f"error: cannot read the spec {path}: {err}", err=True)
        raise typer.Exit(2) from err
    if not isinstance(raw, dict):
        typer.echo(f"error: {path}: expected a mapping of spec fields at the top level", err=True)
        raise typer.Exit(2)
    data = raw.get("data")
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(value, str) and not Path(value).is_absolute() and (path.parent / value).exists():
                data[key] = str(path.parent / value)
    try:
        return PipelineSpec.model_validate(raw)
    except ValidationError as err:
        for error in err.errors():
            field = ".".join(str(part) for part in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            typer.echo(f"error: {path}: {field + ': ' if field else ''}{message}", err=True)
        raise typer.Exit(2) from err


@cli.command()
def api(
    host: Annotated[str | None, typer.Option(help="\\[default: the settings' host]")] = None,
    port: Annotated[int | None, typer.Option(help="\\[default: the settings' port]")] = None,
) -> None:
    """Start the REST API (it migrates the database first)."""
    import uvicorn

    from app.logs import configure_logging
    from app.main import create_app
    from app.settings import get_settings

    settings = get_settings()
    configure_logging(process="api", level=settings.log_level, fmt=settings.log_format)
    # log_config=None: uvicorn's lines go through the same handler, not a format of its own.
    uvicorn.run(create_app(settings), host=host or settings.host, port=port or settings.port, log_config=None)


@cli.command()
def worker(
    queues: Annotated[
        str | None,
        typer.Option("--queues", "-Q", help="Queues, comma-separated \\[default: gpu with a GPU, else cpu]."),
    ] = None,
    concurrency: Annotated[int | None, typer.Option("--concurrency", "-c")] = None,
    pool: Annotated[str, typer.Option(help="Celery pool: prefork, solo or threads.")] = "prefork",
) -> None:
    """Start a Celery worker (it migrates the database first)."""
    from app.services.routing import default_queues
    from app.settings import get_settings
    from workers.celery_app import app as celery_app

    workers = concurrency or get_settings().worker_concurrency
    queues = _check_queues(queues or default_queues())
    celery_app.worker_main(["worker", "-Q", queues, "-c", str(workers), "--pool", pool, "-l", "info"])


def _check_queues(queues: str) -> str:
    """The comma-separated queue names, each one of app/services/routing.py's QUEUES."""
    from app.services.routing import QUEUES

    names = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = [q for q in names if q not in QUEUES]
    if not names or unknown:
        raise typer.BadParameter(f"'{queues}': each queue must be one of {', '.join(QUEUES)}", param_hint="--queues")
    return ",".join(names)


@cli.command()
def migrate() -> None:
    """Bring the database up to the latest schema."""
    from app.db.migrate import upgrade_database
    from app.settings import get_settings

    upgrade_database(get_settings().database_url)


@cli.command()
def run() -> None:
    """Embedded mode: migrate, seed the `demo` dataset, print an API key, start a worker and the API."""
    from app.embedded import run_embedded
    from app.settings import get_settings

    run_embedded(get_settings())


# --- server-side commands: they open the server's database, found the way the server finds it -------------

keys_cli = typer.Typer(no_args_is_help=True, help="API keys (server side: opens the server's database).")
cli.add_typer(keys_cli, name="keys")


def _server_database_url() -> str:
    """The database the server uses (app/settings.py: QADISTILL_DATABASE_URL, else QADISTILL_HOME, else
    ./.qadistill); refuses, rather than creating one, when an embedded database is not there."""
    from app.settings import get_settings

    settings = get_settings()
    url = settings.database_url
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if not path.exists():
            _fail(
                f"no qadistill database at {path}: run this command in the folder the server was started in, "
                "or set QADISTILL_HOME (or QADISTILL_DATABASE_URL) to what the server uses",
                code=2,
            )
    return url


@cli.command("worker-health")
def worker_health() -> None:
    """A container's health check: exit 0 when a worker on this host reported its heartbeat to the database
    within the last three lease periods (its reconciliation loop runs and the database answers), else 1."""
    import socket

    from app.db.base import utcnow
    from app.db.session import session_scope
    from app.services.reconcile import last_heartbeat
    from app.services.routing import LIVE_LEASES
    from app.settings import get_settings

    settings = get_settings()
    host, window = socket.gethostname(), LIVE_LEASES * settings.lease_s
    try:
        with session_scope(settings.database_url) as session:
            seen = last_heartbeat(session, host=host)
    except Exception as exc:
        _fail(f"unhealthy: the database cannot be read ({type(exc).__name__}: {exc})")
    if seen is None:
        _fail(f"unhealthy: no worker on {host} has reported yet")
    age = (utcnow() - seen).total_seconds()
    if age > window:
        _fail(f"unhealthy: the last heartbeat of a worker on {host} is {age:.0f} s old (more than {window:.0f} s)")
    typer.echo(f"healthy: a worker on {host} reported {age:.0f} s ago")


def _open_server_database() -> str:
    """The server's database URL, migrated; a clear error when it cannot be reached."""
    from sqlalchemy.exc import OperationalError

    from app.db.migrate import upgrade_database

    url = _server_database_url()
    try:
        upgrade_database(url)
    except OperationalError as err:
        _fail(f"cannot open the server's database: {err.orig}", code=3)
    return url


@keys_cli.command("create")
def create_key(
    tenant: Annotated[str, typer.Option(help="Tenant name; created when new.")],
    as_json: JsonOption = False,
) -> None:
    """Create an API key for a tenant and print it (it is shown only this once)."""
    from app.db.session import session_scope
    from app.services.auth import create_api_key, get_or_create_tenant

    with session_scope(_open_server_database()) as session:
        key, token = create_api_key(session, tenant=get_or_create_tenant(session, name=tenant))
        shown = {"key": token, "prefix": key.prefix, "tenant": tenant, "created_at": key.created_at.isoformat()}
    typer.echo(json.dumps(shown) if as_json else token)


@keys_cli.command("list")
def list_keys(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List API keys: their shown prefix, tenant, creation and revocation (keys themselves are not stored)."""
    from app.db.session import session_scope
    from app.services.auth import list_api_keys

    with session_scope(_open_server_database()) as session:
        rows = [
            {
                "prefix": key.prefix,
                "tenant": name,
                "created_at": key.created_at.isoformat(),
                "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
            }
            for key, name in list_api_keys(session, tenant=tenant)
        ]
    _emit(rows, as_json, [("prefix", "PREFIX"), ("tenant", "TENANT"), ("created_at", "CREATED"),
                          ("revoked_at", "REVOKED")])  # fmt: skip


@keys_cli.command("revoke")
def revoke_key(
    key: Annotated[str, typer.Argument(help="The key, or the first 10 characters of it.")],
    as_json: JsonOption = False,
) -> None:
    """Revoke an API key: requests with it get 401 from now on."""
    from app.db.session import session_scope
    from app.services.auth import revoke_api_key

    with session_scope(_open_server_database()) as session:
        revoked = revoke_api_key(session, key_or_prefix=key)
    typer.echo(json.dumps({"revoked": revoked}) if as_json else f"revoked {revoked} key(s)")
    if not revoked:
        raise typer.Exit(1)


# --- client commands: each one a call of app.client ----------------------------------------------------

ApiUrl = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar="QADISTILL_URL",
        help="API base URL \\[default: http://HOST:PORT of the server's settings, http://127.0.0.1:8000].",
        show_default=False,
    ),
]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        "--key",
        envvar="QADISTILL_API_KEY",
        help="API key \\[default: the embedded server's key, in QADISTILL_HOME/api-key].",
        show_default=False,
    ),
]


def _client(url: str | None, key: str | None) -> "Client":
    """A client of the API at `url` (else the settings' host and port) as the owner of `key`."""
    from app.client import Client
    from app.embedded import KEY_FILE
    from app.settings import get_settings

    if url is None or key is None:
        settings = get_settings()
        key_file = settings.home / KEY_FILE
        if key is None and key_file.exists():
            key = key_file.read_text().strip()
        url = url or f"http://{settings.host}:{settings.port}"
    if not key:
        _fail("no API key: pass --key or set QADISTILL_API_KEY", code=2)
    return Client(url, key)


@contextmanager
def _reporting_errors(as_json: bool = False) -> Iterator[None]:
    """Turn the client's errors into one readable line on stderr (JSON with --json) and a non-zero exit.

    Exit status: 1 the API refused the request, 3 the service could not be reached.
    """
    from app.client import ApiError, ServiceUnreachable

    try:
        yield
    except ApiError as err:
        if as_json:
            body = {"status": err.status, "code": err.code, "message": err.message, "param": err.param}
            typer.echo(json.dumps({"error": body}), err=True)
        else:
            where = f" (field: {err.param})" if err.param else ""
            retry = f"; retry after {err.retry_after:g} s" if err.retry_after is not None else ""
            typer.echo(f"error: {err.status} {err.code}: {err.message}{where}{retry}", err=True)
        raise typer.Exit(1) from err
    except ServiceUnreachable as err:
        _fail(f"{err}: is the service running? (--url or QADISTILL_URL)", code=3)


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _emit(rows: list[dict[str, Any]], as_json: bool, columns: list[tuple[str, str]]) -> None:
    """Rows as a JSON array (for scripts) or as an aligned table (for people)."""
    if as_json:
        typer.echo(json.dumps(rows, default=str))
    elif not rows:
        typer.echo("(none)")
    else:
        typer.echo(format_table(rows, columns))


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """An aligned plain-text table of `rows` under the titles of `columns` (key, title); None shows as '-'."""
    cells = [[title for _, title in columns]]
    cells += [["-" if row.get(key) is None else str(row[key]) for key, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells)


def _dump(model: Any) -> dict[str, Any]:
    return model.model_dump(mode="json")


def _since(start: datetime | None, end: datetime | None) -> str | None:
    if start is None:
        return None
    seconds = ((end or datetime.now(UTC)) - start).total_seconds()
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


datasets_cli = typer.Typer(no_args_is_help=True, help="Datasets: upload, list, delete.")
cli.add_typer(datasets_cli, name="datasets")
_DATASET_COLUMNS = [("id", "ID"), ("name", "NAME"), ("format", "FORMAT"), ("pairs", "PAIRS"),
                    ("questions", "QUESTIONS"), ("positives", "POSITIVES"), ("labelled", "LABELLED"),
                    ("created_at", "CREATED")]  # fmt: skip


@datasets_cli.command("upload")
def upload_dataset(
    file: Annotated[Path, typer.Argument(help="JSON Lines, CSV or TSV with question, passage, label, qid.")],
    name: Annotated[str | None, typer.Option(help="Unique per tenant \\[default: the file name].")] = None,
    format: Annotated[str | None, typer.Option(help="jsonl, csv or tsv \\[default: from the file name].")] = None,
    url: ApiUrl = None,
    key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Upload a dataset; every row is checked and an error names its line and field."""
    if not file.is_file():
        _fail(f"no such file: {file}", code=2)
    with _reporting_errors(as_json), _client(url, key) as client:
        dataset = client.upload_dataset(file, name=name, format=format)
    if as_json:
        typer.echo(json.dumps(_dump(dataset)))
    else:
        typer.echo(
            f"{dataset.id}  {dataset.name}: {dataset.pairs} pairs, {dataset.questions} questions, "
            f"{dataset.positives} positives{'' if dataset.labelled else ', unlabelled'}"
        )


@datasets_cli.command("list")
def list_datasets(url: ApiUrl = None, key: ApiKeyOption = None, as_json: JsonOption = False) -> None:
    """List the datasets, newest first."""
    with _reporting_errors(as_json), _client(url, key) as client:
        rows = [_dump(d) for d in _all_pages(lambda cursor: client.list_datasets(limit=100, cursor=cursor))]
    _emit(rows, as_json, _DATASET_COLUMNS)


@datasets_cli.command("delete")
def delete_dataset(
    dataset: Annotated[str, typer.Argument(help="Dataset id or name.")],
    url: ApiUrl = None,
    key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete a dataset (refused while a job that has not finished uses it)."""
    with _reporting_errors(as_json), _client(url, key) as client:
        client.delete_dataset(dataset)
    typer.echo(json.dumps({"deleted": dataset}) if as_json else f"deleted {dataset}")


def _all_pages(fetch: Callable[[str | None], Any], limit: int | None = None) -> list[Any]:
    """Every item of a paged list (at most `limit`), following next_cursor."""
    items: list[Any] = []
    cursor = None
    while True:
        page = fetch(cursor)
        items += page.data
        cursor = page.next_cursor
        if not page.has_more or cursor is None or (limit is not None and len(items) >= limit):
            return items[:limit]


@cli.command()
def submit(
    spec: Annotated[Path, typer.Argument(help="Job spec, JSON or YAML (data.* are dataset ids or names).")],
    url: ApiUrl = None,
    key: ApiKeyOption = None,
    idempotency_key: Annotated[str | None, typer.Option(help="Retries with it return the same job.")] = None,
    follow: Annotated[
        bool, typer.Option(help="Show a progress bar per stage and the events until the job ends.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Submit a distillation job to the API; with --follow, wait for it (exit 1 unless it succeeds)."""
    import yaml

    try:
        body = yaml.safe_load(spec.read_text())  # JSON is YAML too
    except (OSError, yaml.YAMLError) as err:
        _fail(f"cannot read the spec {spec}: {err}", code=2)
    if not isinstance(body, dict):
        _fail(f"{spec}: expected a mapping of spec fields at the top level", code=2)
    with _reporting_errors(as_json), _client(url, key) as client:
        job = client.submit_job(body, idempotency_key=idempotency_key)
        if not follow:
            typer.echo(json.dumps(_dump(job)) if as_json else f"{job.id}  {job.name}: {job.status}")
            return
        if not as_json:
            typer.echo(f"{job.id}  {job.name}: {job.status}")
        job = _watch(client, job.id, show_events=not as_json)
    _end_of_watch(job, as_json)


_JOB_COLUMNS = [("id", "ID"), ("name", "NAME"), ("status", "STATUS"), ("stage", "STAGE"), ("progress", "PROGRESS"),
                ("took", "TOOK"), ("model", "MODEL"), ("created_at", "CREATED")]  # fmt: skip


@cli.command("jobs")
def list_jobs(
    status: Annotated[
        str | None, typer.Option(help="Only jobs with this status (queued, running, succeeded, ...).")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 20,
    url: ApiUrl = None,
    key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """List jobs, newest first."""
    with _reporting_errors(as_json), _client(url, key) as client:
        jobs = _all_pages(lambda c: client.list_jobs(status=status, limit=min(limit, 100), cursor=c), limit)
    if as_json:
        typer.echo(json.dumps([_dump(j) for j in jobs]))
        return
    rows = [
        {
            "id": j.id,
            "name": j.name,
            "status": j.status,
            "stage": j.stage,
            "progress": f"{j.progress:.0%}",
            "took": _since(j.started_at, j.finished_at),
            "model": f"{j.model.name}:{j.model.version}" if j.model else None,
            "created_at": j.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        }
        for j in jobs
    ]
    _emit(rows, False, _JOB_COLUMNS)


@cli.command()
def status(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    url: ApiUrl = None,
    key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """A job's status in a few lines: stage, progress, times, error, model and, once done, its MAP."""
    with _reporting_errors(as_json), _client(url, key) as client:
        job = client.get_job(job_id)
        metrics = client.job_metrics(job_id) if job.status == "succeeded" else None
    if as_json:
        typer.echo(json.dumps(_dump(job) | ({"report": metrics.final} if metrics else {})))
        return
    typer.echo(format_job_summary(job, metrics.final if metrics else None))


def format_job_summary(job: "Job", report: dict[str, Any] | None) -> str:
    """A few lines a person reads: what the job is, where it stands, and its result."""
    variants = ", ".join(job.spec.get("variants", [])) or "-"
    lines = [
        f"job       {job.id}  {job.name}",
        f"status    {job.status}{' (cancel requested)' if job.cancel_requested and not job.finished else ''}",
        f"stage     {job.stage or '-'}  {job.progress:.0%}",
        f"queue     {job.queue or '-'}",
        f"variants  {variants}",
        f"created   {job.created_at:%Y-%m-%d %H:%M:%S}",
    ]
    if job.started_at:
        lines.append(f"ran       {_since(job.started_at, job.finished_at)}{'' if job.finished else ' so far'}")
    if job.error:
        where = f" (field: {job.error.param})" if job.error.param else ""
        lines.append(f"error     {job.error.code}: {job.error.message}{where}")
    if job.model:
        lines.append(f"model     {job.model.name}:{job.model.version}")
    for table in (report or {}).get("sets", []):
        best = [r for r in table.get("rows", []) if not str(r.get("model", "")).startswith("floor:")]
        summary = ", ".join(f"{r['model']} {r['map']:.3f}" for r in best if r.get("map") is not None)
        lines.append(f"MAP       {table.get('name', '?')}: {summary}")
    return "\n".join(lines)


@cli.command()
def cancel(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    url: ApiUrl = None,
    key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Stop a job: a queued one ends at once, a running one at its next training step."""
    with _reporting_errors(as_json), _client(url, key) as client:
        job = client.cancel_job(job_id)
    typer.echo(json.dumps(_dump(job)) if as_json else f"{job.id}  {job.name}: {job.status}")


@cli.command()
def logs(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing events until the job ends.")] = False,
    url: ApiUrl = None,
    key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Print a job's events (with --json, one JSON object a line)."""
    from app.client import JobEnded

    with _reporting_errors(as_json), _client(url, key) as client:
        if follow:
            for item in client.follow_events(job_id):
                if isinstance(item, JobEnded):
                    if not as_json:
                        typer.echo(f"job {item.job.id}: {item.job.status}")
                else:
                    typer.echo(json.dumps(_dump(item)) if as_json else format_event(item))
            return
        after = 0
        while True:
            page = client.job_events(job_id, after=after, limit=1000)
            for event in page.data:
                typer.echo(json.dumps(_dump(event)) if as_json else format_event(event))
            if len(page.data) < 1000:
                return
            after = page.data[-1].id


def format_event(event: "JobEvent") -> str:
    """One event as a log line."""
    level = "" if event.level == "info" else f" {event.level.upper()}"
    return f"{event.ts:%H:%M:%S}{level} [{event.stage}] {event.message}"


@cli.command()
def models(
    name: Annotated[str | None, typer.Option(help="Only versions of this model.")] = None,
    url: ApiUrl = None,
    key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """List model versions, newest first, with their aliases and the primary variant's MAP."""
    with _reporting_errors(as_json), _client(url, key) as client:
        versions = _all_pages(lambda c: client.list_models(name=name, limit=100, cursor=c))
        aliases: dict[tuple[str, int], list[str]] = {}
        for model_name in sorted({v.name for v in versions}):
            for alias in client.list_aliases(model_name):
                aliases.setdefault((alias.name, alias.version), []).append(alias.alias)
    rows = [
        _dump(v) | {"aliases": aliases.get((v.name, v.version), []), "map": primary_map(v.metrics)} for v in versions
    ]
    if as_json:
        typer.echo(json.dumps(rows))
        return
    for row in rows:
        row["aliases"] = ", ".join(row["aliases"]) or None
        row["map"] = None if row["map"] is None else f"{row['map']:.4f}"
    _emit(rows, False, [("name", "NAME"), ("version", "VERSION"), ("aliases", "ALIASES"), ("map", "MAP"),
                        ("job_id", "JOB"), ("created_at", "CREATED")])  # fmt: skip


def primary_map(metrics: dict[str, Any]) -> float | None:
    """The MAP of the report's primary variant on its first evaluation set, when the report has one."""
    primary = metrics.get("primary")
    for row in metrics.get("rows", []):
        if row.get("model") == primary:
            return row.get("map")
    return None


@cli.command()
def promote(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int, typer.Argument(help="The version the alias should point at.")],
    alias: Annotated[str, typer.Option("--alias", "-a", help="The alias to move.")] = "production",
    url: ApiUrl = None,
    key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Point NAME@ALIAS at VERSION: promote a new version, or roll back to an older one."""
    with _reporting_errors(as_json), _client(url, key) as client:
        moved = client.set_alias(name, version, alias=alias)
    typer.echo(json.dumps(_dump(moved)) if as_json else f"{moved.name}@{moved.alias} -> version {moved.version}")


@cli.command()
def unalias(
    name: Annotated[str, typer.Argument(help="Model name.")],
    alias: Annotated[str, typer.Argument(help="The alias to remove (its version stays registered).")],
    url: ApiUrl = None,
    key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Remove NAME@ALIAS; NAME alone then resolves to the latest version if ALIAS was `production`."""
    with _reporting_errors(as_json), _client(url, key) as client:
        client.delete_alias(name, alias=alias)
    typer.echo(json.dumps({"name": name, "alias": alias, "deleted": True}) if as_json else f"{name}@{alias} deleted")


@cli.command()
def ask(
    model: Annotated[str, typer.Argument(help="NAME, NAME@ALIAS or NAME:VERSION.")],
    question: Annotated[str, typer.Option("--question", "-q", help="The question.")],
    passages: Annotated[list[str], typer.Option("--passage", "-p", help="A candidate passage; repeat for each.")],
    top_k: Annotated[int | None, typer.Option(help="Only the best k passages \\[default: all].")] = None,
    url: ApiUrl = None,
    key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Rank candidate passages for a question with a model, best first."""
    with _reporting_errors(as_json), _client(url, key) as client:
        answer = client.answer(model, question, passages, top_k=top_k)
    if as_json:
        typer.echo(json.dumps(_dump(answer)))
        return
    typer.echo(f"{answer.model.name}:{answer.model.version} in {answer.took_ms:.1f} ms")
    rows = [{"rank": i, "score": f"{a.score:.4f}", "passage": a.passage} for i, a in enumerate(answer.answers, 1)]
    typer.echo(format_table(rows, [("rank", "#"), ("score", "SCORE"), ("passage", "PASSAGE")]))


# --- following a job: a bar per stage (pipeline progress, polled) and its events (streamed) --------------

WATCH_POLL_S = 1.0


def _watch(client: "Client", job_id: str, *, show_events: bool) -> "Job":
    """Follow a job to its end: a tqdm bar per stage on stderr, events on stdout; returns the ended job.

    Ctrl-C stops watching, not the job.
    """
    from tqdm import tqdm

    from app.client import JobEnded

    bars = _StageBars(client, job_id)
    poller = threading.Thread(target=bars.run, daemon=True)
    poller.start()
    ended = None
    try:
        for item in client.follow_events(job_id):
            if isinstance(item, JobEnded):
                ended = item.job
            elif show_events:
                tqdm.write(format_event(item))
    except KeyboardInterrupt:
        bars.stop()
        _fail(f"stopped following; the job goes on (`qadistill cancel {job_id}` stops it)", code=130)
    finally:
        bars.stop()
        poller.join(timeout=5)
    return ended or client.get_job(job_id)


class _StageBars:
    """Polls the job and draws one bar per stage: the pipeline's progress while that stage runs."""

    def __init__(self, client: "Client", job_id: str) -> None:
        self.client, self.job_id = client, job_id
        self.done = threading.Event()
        self.bar: Any = None
        self.stage: str | None = None

    def run(self) -> None:
        from app.client import ClientError

        while not self.done.is_set():
            try:
                job = self.client.get_job(self.job_id)
            except ClientError:
                job = None  # the event stream reports what matters; a missed poll only delays a bar
            if job is not None and job.stage and not self.done.is_set():
                self.show(job.stage, job.progress)
            self.done.wait(WATCH_POLL_S)

    def show(self, stage: str, progress: float) -> None:
        from tqdm import tqdm

        if stage != self.stage:
            self.close_bar()
            self.stage = stage
            self.bar = tqdm(total=100, desc=stage, unit="%", bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}")
        self.bar.n = round(progress * 100)
        self.bar.refresh()

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = None

    def stop(self) -> None:
        self.done.set()
        self.close_bar()


def _end_of_watch(job: "Job", as_json: bool) -> None:
    """Print how a watched job ended; exit 1 unless it succeeded."""
    if as_json:
        typer.echo(json.dumps(_dump(job)))
    else:
        detail = f" ({job.error.code}: {job.error.message})" if job.error else ""
        model = f"; model {job.model.name}:{job.model.version}" if job.model else ""
        typer.echo(f"job {job.id}: {job.status}{detail}{model}")
    if job.status != "succeeded":
        raise typer.Exit(1)


def main() -> None:
    """Entry point of the `qadistill` console script."""
    cli()
