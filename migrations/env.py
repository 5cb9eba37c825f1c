"""Alembic environment: runs on the connection app.db.migrate hands over, or on the configured URL."""

from alembic import context
from sqlalchemy import Connection

from app.db import models  # noqa: F401  (registers every table on Base.metadata)
from app.db.base import Base
from app.db.session import make_engine
from app.settings import get_settings

target_metadata = Base.metadata


def run_on(connection: Connection) -> None:
    """Apply the migrations on one open connection."""
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    run_on(connection)
else:
    url = context.config.get_main_option("sqlalchemy.url") or get_settings().database_url
    engine = make_engine(url)
    with engine.connect() as conn:
        run_on(conn)
    engine.dispose()
