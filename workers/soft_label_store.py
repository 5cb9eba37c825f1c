"""A job's soft labels in the artifact store, so that a worker on another host reuses them instead of running
every teacher over the data again.

The pipeline caches soft labels in the worker's local cache (cache_dir/soft-labels/<teacher fingerprint>/
<data sha256>-...). Before a run, the tenant's stored files for the job's data sets are copied into that cache;
as the run goes, the files it has for those data sets are copied to `<tenant>/soft-labels/...` in the store.
Only files named by the job's data hashes move: the local cache is shared by every tenant's jobs on the host.
"""

import logging
from pathlib import Path

from app.storage import ArtifactStore

log = logging.getLogger(__name__)

FOLDER = "soft-labels"


class SoftLabelStore:
    """The soft labels of one job's data sets, mirrored between the local cache and the store."""

    def __init__(self, store: ArtifactStore, *, tenant_id: str, data_sha256: set[str], cache_dir: Path) -> None:
        self.store, self.data_sha256 = store, data_sha256
        self.key = f"{tenant_id}/{FOLDER}"
        self.local = cache_dir / FOLDER
        self.stored: set[str] = set()

    def _ours(self, relative: str) -> bool:
        return Path(relative).name.split("-", 1)[0] in self.data_sha256

    def pull(self) -> int:
        """Copy the stored soft labels of the job's data into the local cache; how many were fetched."""
        fetched = 0
        for relative in self.store.list_files(self.store.uri(self.key)):
            if not self._ours(relative):
                continue
            self.stored.add(relative)
            target = self.local / relative
            if target.is_file():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f"{target.name}.partial")
            with self.store.open(self.store.uri(f"{self.key}/{relative}")) as source:
                partial.write_bytes(source.read())
            partial.replace(target)
            fetched += 1
        if fetched:
            log.info("fetched %d soft-label files from the artifact store", fetched)
        return fetched

    def push(self) -> int:
        """Copy the job's soft labels that the store lacks from the local cache to it; how many were sent."""
        if not self.local.is_dir():
            return 0
        sent = 0
        for path in sorted(self.local.rglob("*.safetensors")):
            relative = str(path.relative_to(self.local))
            if relative in self.stored or not self._ours(relative):
                continue
            self.store.put_file(path, f"{self.key}/{relative}")
            self.stored.add(relative)
            sent += 1
        return sent
