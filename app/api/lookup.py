"""The answering path's lookup of (API key, model reference) -> model version, remembered for a few seconds.

Authenticating the key and resolving `name`, `name@alias` or `name:version` take several queries and a
hop to a worker thread: per question, that would cost more than a compact student's inference. A
resolution is therefore kept for `ttl_s` seconds. Writes made through this process (aliases) clear it at
once; those made through another process (another API worker, `qadistill keys revoke`) are seen within
`ttl_s`. Failures (401, 404) are never kept, so a model registered a moment ago answers at once.
"""

from cachetools import TTLCache
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session, sessionmaker

from app.api.deps import tenant_of_key
from app.services import registry
from app.services.auth import hash_key
from app.serving.runtime import ServedVersion

MAX_ENTRIES = 10_000


class VersionLookup:
    """Resolves the model version a request names, for the tenant whose key it carries."""

    def __init__(self, sessions: sessionmaker[Session], *, ttl_s: float) -> None:
        self._sessions = sessions
        self._cache: TTLCache[tuple[str, str], ServedVersion] | None = (
            TTLCache(MAX_ENTRIES, ttl_s) if ttl_s > 0 else None
        )

    async def resolve(self, token: str, ref: str) -> ServedVersion:
        """The version `ref` points at for the key `token`'s tenant; ApiError 401 or 404 otherwise."""
        if self._cache is None:
            return await run_in_threadpool(self._query, token, ref)
        # Keyed by the key's digest: the cache never holds a usable secret. Only the event loop touches it.
        key = (hash_key(token), ref)
        version = self._cache.get(key)
        if version is None:
            version = await run_in_threadpool(self._query, token, ref)
            self._cache[key] = version
        return version

    def clear(self) -> None:
        """Forget every resolution (after an alias or a version changed)."""
        if self._cache is not None:
            self._cache.clear()

    def _query(self, token: str, ref: str) -> ServedVersion:
        with self._sessions() as session:
            tenant = tenant_of_key(session, token)
            row = registry.resolve_version(session, tenant_id=tenant.id, ref=ref)
            return ServedVersion(id=row.id, name=row.name, version=row.version, artifact_uri=row.artifact_uri)
