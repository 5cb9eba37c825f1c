"""The demo: a small Q&A dataset written for the project, seeded as `demo` for a tenant."""

import hashlib
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Dataset, Tenant
from app.services.datasets import create_dataset
from app.storage import ArtifactStore

DEMO_FILE = Path(__file__).resolve().parents[1] / "demo" / "qa.jsonl"
DEMO_NAME = "demo"


def seed_demo_dataset(session: Session, store: ArtifactStore, *, tenant: Tenant) -> Dataset:
    """The tenant's `demo` dataset, uploaded from the packaged file when missing (idempotent)."""
    existing = session.scalar(select(Dataset).where(Dataset.tenant_id == tenant.id, Dataset.name == DEMO_NAME))
    if existing is not None:
        return existing
    content = DEMO_FILE.read_bytes()
    dataset, _ = create_dataset(
        session,
        store,
        tenant=tenant,
        local_path=DEMO_FILE,
        filename=DEMO_FILE.name,
        sha256=hashlib.sha256(content).hexdigest(),
        size_bytes=len(content),
        name=DEMO_NAME,
    )
    return dataset
