"""The `qadistill` command. Each sub-command is a thin shell over a library call."""

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from app.distill.spec import PipelineSpec

if TYPE_CHECKING:
    import httpx

cli = typer.Typer(no_args_is_help=True, add_completion=False, help="Distil Q&A models and serve them.")


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
        typer.Option(help="Soft-label and pretrained-model cache [default: the settings' cache_dir]."),
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
    host: Annotated[str | None, typer.Option(help="[default: the settings' host]")] = None,
    port: Annotated[int | None, typer.Option(help="[default: the settings' port]")] = None,
) -> None:
    """Start the REST API (it migrates the database first)."""
    import uvicorn

    from app.main import create_app
    from app.settings import get_settings

    settings = get_settings()
    uvicorn.run(create_app(settings), host=host or settings.host, port=port or settings.port)


@cli.command()
def worker(
    queues: Annotated[str, typer.Option("--queues", "-Q", help="Queues to consume.")] = "gpu,default",
    concurrency: Annotated[int | None, typer.Option("--concurrency", "-c")] = None,
    pool: Annotated[str, typer.Option(help="Celery pool: prefork, solo or threads.")] = "prefork",
) -> None:
    """Start a Celery worker (it migrates the database first)."""
    from app.settings import get_settings
    from workers.celery_app import app as celery_app

    workers = concurrency or get_settings().worker_concurrency
    celery_app.worker_main(["worker", "-Q", queues, "-c", str(workers), "--pool", pool, "-l", "info"])


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


keys_cli = typer.Typer(no_args_is_help=True, help="API keys.")
cli.add_typer(keys_cli, name="keys")


@keys_cli.command("create")
def create_key(tenant: Annotated[str, typer.Option(help="Tenant name; created when new.")]) -> None:
    """Create an API key for a tenant and print it (it is shown only this once)."""
    from app.db.migrate import upgrade_database
    from app.db.session import session_scope
    from app.services.auth import create_api_key, get_or_create_tenant
    from app.settings import get_settings

    settings = get_settings()
    upgrade_database(settings.database_url)
    with session_scope(settings.database_url) as session:
        _, token = create_api_key(session, tenant=get_or_create_tenant(session, name=tenant))
    typer.echo(token)


@keys_cli.command("revoke")
def revoke_key(key: Annotated[str, typer.Argument(help="The key, or the first 10 characters of it.")]) -> None:
    """Revoke an API key: requests with it get 401 from now on."""
    from app.db.session import session_scope
    from app.services.auth import revoke_api_key
    from app.settings import get_settings

    with session_scope(get_settings().database_url) as session:
        revoked = revoke_api_key(session, key_or_prefix=key)
    typer.echo(f"revoked {revoked} key(s)")
    if not revoked:
        raise typer.Exit(1)


ApiUrl = Annotated[str | None, typer.Option("--url", help="API base URL [default: http://<host>:<port>].")]
ApiKeyOption = Annotated[
    str | None, typer.Option("--key", envvar="QADISTILL_API_KEY", help="API key [default: the embedded one].")
]


def _api_client(url: str | None, key: str | None) -> "httpx.Client":
    import httpx

    from app.embedded import KEY_FILE
    from app.settings import get_settings

    settings = get_settings()
    key_file = settings.home / KEY_FILE
    if key is None and key_file.exists():
        key = key_file.read_text().strip()
    if key is None:
        typer.echo("error: no API key: pass --key or set QADISTILL_API_KEY", err=True)
        raise typer.Exit(2)
    base = url or f"http://{settings.host}:{settings.port}"
    return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def _exit_on_error(response: "httpx.Response") -> None:
    if response.is_error:
        typer.echo(f"error {response.status_code}: {response.text}", err=True)
        raise typer.Exit(1)


def _follow_events(client: "httpx.Client", job_id: str) -> None:
    import json

    event = ""
    with client.stream("GET", f"/v1/jobs/{job_id}/events", params={"follow": "true"}, timeout=None) as stream:
        _exit_on_error(stream)
        for line in stream.iter_lines():
            if line.startswith("event:"):
                event = line.removeprefix("event:").strip()
            elif line.startswith("data:"):
                data = json.loads(line.removeprefix("data:"))
                if event == "end":
                    typer.echo(f"job {job_id}: {data['status']}")
                else:
                    typer.echo(f"{data['ts']} [{data['stage']}] {data['message']}")


@cli.command()
def submit(
    spec: Annotated[Path, typer.Argument(help="Job spec, JSON or YAML (data.* are dataset ids or names).")],
    url: ApiUrl = None,
    key: ApiKeyOption = None,
    idempotency_key: Annotated[str | None, typer.Option(help="Retries with it return the same job.")] = None,
    follow: Annotated[bool, typer.Option(help="Print the job's events until it ends.")] = False,
) -> None:
    """Submit a distillation job to the API and print it."""
    import json

    import yaml

    body = yaml.safe_load(spec.read_text())
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    with _api_client(url, key) as client:
        response = client.post("/v1/jobs", json=body, headers=headers)
        _exit_on_error(response)
        job = response.json()
        typer.echo(json.dumps(job, indent=2))
        if follow:
            _follow_events(client, job["id"])


@cli.command()
def status(
    job_id: Annotated[str, typer.Argument()],
    url: ApiUrl = None,
    key: ApiKeyOption = None,
    follow: Annotated[bool, typer.Option(help="Print the job's events until it ends.")] = False,
) -> None:
    """Print a job's status (and follow its events)."""
    import json

    with _api_client(url, key) as client:
        if follow:
            _follow_events(client, job_id)
        response = client.get(f"/v1/jobs/{job_id}")
        _exit_on_error(response)
        typer.echo(json.dumps(response.json(), indent=2))


def main() -> None:
    """Entry point of the `qadistill` console script."""
    cli()
