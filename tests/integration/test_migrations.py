"""The Alembic history: up, down and up again on PostgreSQL, and the models match it exactly."""

import os
import secrets
from collections.abc import Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from app.db.base import Base
from app.db.migrate import downgrade_database, upgrade_database
from app.db.session import make_engine

PG_ADMIN_URL = os.environ.get("QADISTILL_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
TABLES = {
    "tenants",
    "api_keys",
    "datasets",
    "jobs",
    "job_datasets",
    "job_events",
    "metrics",
    "model_versions",
}

pytestmark = pytest.mark.integration


@pytest.fixture
def empty_database() -> Iterator[str]:
    name = f"qadistill_mig_{os.getpid()}_{secrets.token_hex(3)}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def _schema_diff(url: str) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade_matches_models(empty_database):
    upgrade_database(empty_database)
    assert _tables(empty_database) == TABLES | {"aliases"}
    assert _schema_diff(empty_database) == []
    downgrade_database(empty_database)
    assert _tables(empty_database) == set()
    upgrade_database(empty_database)
    upgrade_database(empty_database)  # a second start finds nothing to do
    assert _schema_diff(empty_database) == []
