"""Apply Alembic migrations at start, serialised so an API and a worker starting together never race."""

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url

from app.db.session import make_engine, normalize_url

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
# Any constant works: it only has to be the same in every process migrating this database.
PG_LOCK_ID = 0x71AD15
HEAD = "head"


def migrations_dir() -> Path:
    """The Alembic scripts: beside the source tree, or in the working folder of an installed copy (Docker)."""
    for root in (REPO_ROOT, Path.cwd()):
        if (root / "migrations" / "env.py").is_file():
            return root / "migrations"
    raise FileNotFoundError(f"no migrations/ folder in {REPO_ROOT} or {Path.cwd()}")


def alembic_config(url: str) -> Config:
    """The Alembic configuration of this repository, pointed at `url`."""
    scripts = migrations_dir()
    config = Config(str(scripts.parent / "alembic.ini"))
    config.set_main_option("script_location", str(scripts))
    config.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return config


@contextmanager
def _sqlite_file_lock(url: str) -> Iterator[None]:
    database = make_url(url).database
    if not database or database == ":memory:":
        yield
        return
    lock_path = Path(database).with_suffix(".migrate.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(url: str, action: str, revision: str) -> None:
    engine = make_engine(url)
    try:
        if engine.dialect.name == "sqlite":
            Path(make_url(url).database or ".").parent.mkdir(parents=True, exist_ok=True)
            with _sqlite_file_lock(url), engine.begin() as conn:
                _apply(conn, url, action, revision)
        else:
            with engine.connect() as conn:
                # A session-level advisory lock: the second process waits, then finds nothing to do.
                conn.execute(text("SELECT pg_advisory_lock(:id)"), {"id": PG_LOCK_ID})
                conn.commit()
                try:
                    with conn.begin():
                        _apply(conn, url, action, revision)
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": PG_LOCK_ID})
                    conn.commit()
    finally:
        engine.dispose()


def _apply(conn: Connection, url: str, action: str, revision: str) -> None:
    config = alembic_config(url)
    config.attributes["connection"] = conn
    if action == "upgrade":
        command.upgrade(config, revision)
    else:
        command.downgrade(config, revision)


def upgrade_database(url: str, revision: str = HEAD) -> None:
    """Bring the database at `url` to `revision` (the latest by default)."""
    log.info("migrating database to %s", revision)
    _run(url, "upgrade", revision)


def downgrade_database(url: str, revision: str = "base") -> None:
    """Take the database at `url` back to `revision` (empty by default)."""
    _run(url, "downgrade", revision)
