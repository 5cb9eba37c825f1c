"""The Alembic history: up, down and up again on PostgreSQL, and the models match it exactly."""

from collections.abc import Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from app.db.base import Base
from app.db.migrate import downgrade_database, upgrade_database
from app.db.session import make_engine
from tests.pg import fresh_database

TABLES = {
    "tenants",
    "api_keys",
    "datasets",
    "jobs",
    "job_datasets",
    "job_events",
    "metrics",
    "model_versions",
    "job_leases",
    "workers",
    "job_tasks",
}

pytestmark = pytest.mark.integration


@pytest.fixture
def empty_database() -> Iterator[str]:
    with fresh_database("qadistill_mig") as url:
        yield url


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
