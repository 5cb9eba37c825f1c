"""The application factory: routers, error handlers, request metrics, and a lifespan that migrates."""

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.concurrency import run_in_threadpool

from app.api import answer, datasets, health, jobs, model_download, models, rerank_cohere, rerank_tei, web
from app.api.deps import reject_nul_characters
from app.api.errors import RequestIds, install_error_handlers
from app.api.lookup import VersionLookup
from app.db.migrate import upgrade_database
from app.db.session import make_engine, make_sessionmaker
from app.services.queue import make_celery
from app.serving.downloads import DownloadCache
from app.serving.runtime import ServingRuntime
from app.settings import Settings, get_settings
from app.storage import ArtifactStore

log = logging.getLogger(__name__)

DESCRIPTION = """Distil large Q&A cross-encoders into compact student ensembles (TMKD) and serve them.

Authenticate with `Authorization: Bearer <API key>` (`qadistill keys create --tenant NAME`).
Errors are `{"error": {"code", "message", "param"}}`, `param` naming the field at fault.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """The FastAPI application for `settings` (read from the environment when None)."""
    settings = settings or get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(upgrade_database, settings.database_url)
        log.info("api ready: database %s", engine.url.render_as_string(hide_password=True))
        await app.state.serving.start()
        # Everything imported and built so far (torch, transformers, the app) lives as long as the process:
        # kept out of the collector's sight, a full collection no longer walks it, which otherwise stalls
        # every request in flight for a few hundred milliseconds now and then.
        gc.collect()
        gc.freeze()
        yield
        await app.state.serving.aclose()
        engine.dispose()

    # A hard cap on any request body, enforced while it streams in (a chunked body declares no length), at
    # twice the largest route limit: below it the routes' own limits (max_request_bytes, max_upload_bytes)
    # answer with their precise errors; past it the body is cut off with 413 before it is all read.
    body_cap = 2 * max(settings.max_request_bytes, settings.max_upload_bytes + datasets.FORM_OVERHEAD)
    app = FastAPI(
        title="qadistill",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        max_body_size=body_cap,
        dependencies=[Depends(reject_nul_characters)],
        docs_url=None,  # served by app.api.web with local assets, not a CDN's
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = make_sessionmaker(engine)
    app.state.store = ArtifactStore(settings.artifacts_url)
    app.state.celery = make_celery(settings)
    downloads = DownloadCache(app.state.store, settings.cache_dir / "models", settings.serve_download_cache_bytes)
    app.state.downloads = downloads
    app.state.serving = ServingRuntime(settings, fetch_dir=downloads.fetch)
    app.state.version_lookup = VersionLookup(app.state.sessionmaker, ttl_s=settings.serve_lookup_ttl_s)
    install_error_handlers(app)
    app.add_middleware(RequestIds)
    app.add_middleware(health.RequestMetrics)  # outermost: it counts the 500s that RequestIds renders
    routers = (health.router, datasets.router, jobs.router, model_download.router, models.router, answer.router)
    for router in (*routers, rerank_cohere.router, rerank_tei.router):
        app.include_router(router)
    web.add_web(app)
    return app
