"""Tenants and API keys: keys are high-entropy tokens stored only as their sha256."""

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import ApiKey, Tenant

KEY_PREFIX = "qd_"
SHOWN_PREFIX_CHARS = 10


def hash_key(token: str) -> str:
    """The stored form of a key."""
    return hashlib.sha256(token.encode()).hexdigest()


def get_or_create_tenant(session: Session, *, name: str) -> Tenant:
    """The tenant called `name`, created when missing."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is not None:
        return tenant
    try:
        with session.begin_nested():
            tenant = Tenant(name=name)
            session.add(tenant)
    except IntegrityError:
        # Another process created it between our read and write.
        tenant = session.scalars(select(Tenant).where(Tenant.name == name)).one()
    return tenant


def create_api_key(session: Session, *, tenant: Tenant) -> tuple[ApiKey, str]:
    """A new key for `tenant`: the row and the token, which is shown once and never stored."""
    token = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(tenant_id=tenant.id, prefix=token[:SHOWN_PREFIX_CHARS], key_sha256=hash_key(token))
    session.add(key)
    session.flush()
    return key, token


def authenticate(session: Session, token: str) -> Tenant | None:
    """The tenant owning the live key `token`, or None."""
    if not token.startswith(KEY_PREFIX):
        return None
    digest = hash_key(token)
    candidates = session.scalars(
        select(ApiKey).where(ApiKey.prefix == token[:SHOWN_PREFIX_CHARS], ApiKey.revoked_at.is_(None))
    ).all()
    for key in candidates:
        if hmac.compare_digest(key.key_sha256, digest):
            return session.get(Tenant, key.tenant_id)
    return None


def revoke_api_key(session: Session, *, key_or_prefix: str) -> int:
    """Revoke a key, named by itself or by its shown prefix; returns how many live keys were revoked."""
    shown = key_or_prefix[:SHOWN_PREFIX_CHARS]
    if len(shown) < SHOWN_PREFIX_CHARS:
        return 0
    candidates = session.scalars(select(ApiKey).where(ApiKey.prefix == shown, ApiKey.revoked_at.is_(None))).all()
    whole_key = len(key_or_prefix) > SHOWN_PREFIX_CHARS
    revoked = [k for k in candidates if not whole_key or hmac.compare_digest(k.key_sha256, hash_key(key_or_prefix))]
    for key in revoked:
        key.revoked_at = utcnow()
    session.flush()
    return len(revoked)


def list_api_keys(session: Session, *, tenant: str | None = None) -> list[tuple[ApiKey, str]]:
    """Every key (live and revoked) with its tenant's name, oldest first; only `tenant`'s when given."""
    stmt = select(ApiKey, Tenant.name).join(Tenant, ApiKey.tenant_id == Tenant.id).order_by(ApiKey.created_at)
    if tenant is not None:
        stmt = stmt.where(Tenant.name == tenant)
    return [(key, name) for key, name in session.execute(stmt)]
