"""A job's soft labels and reference embeddings in the artifact store, so that a worker on another host reuses
them instead of running every teacher (and the students' reference model) over the data again.

The pipeline caches both in the worker's local cache (cache_dir/soft-labels/<teacher fingerprint>/<data
sha256>-... and cache_dir/embeddings/<fingerprint>/<data sha256>-...). Before a run, the tenant's stored files
for the job's data sets are copied into that cache; as the run goes, the files it has for those data sets are
copied to `<tenant>/soft-labels/...` and `<tenant>/embeddings/...` in the store. Only files named by the job's
data hashes move: the local cache is shared by every tenant's jobs on the host.
"""

import logging
from pathlib import Path

from app.storage import ArtifactStore

log = logging.getLogger(__name__)

FOLDERS = ("soft-labels", "embeddings")


class CacheMirror:
    """The cached soft labels and embeddings of one job's data sets, mirrored between the local cache and the
    store; files are named by their path under the cache, e.g. 'soft-labels/<fingerprint>/<sha>-len128.safetensors'."""

    def __init__(self, store: ArtifactStore, *, tenant_id: str, data_sha256: set[str], cache_dir: Path) -> None:
        self.store, self.data_sha256 = store, data_sha256
        self.tenant_id = tenant_id
        self.local = cache_dir
        self.stored: set[str] = set()

    def _ours(self, relative: str) -> bool:
        return Path(relative).name.split("-", 1)[0] in self.data_sha256

    def _uri(self, relative: str) -> str:
        return self.store.uri(f"{self.tenant_id}/{relative}")

    def pull(self) -> int:
        """Copy the stored files of the job's data into the local cache; how many were fetched."""
        fetched = 0
        for folder in FOLDERS:
            for name in self.store.list_files(self._uri(folder)):
                relative = f"{folder}/{name}"
                if not self._ours(relative):
                    continue
                self.stored.add(relative)
                target = self.local / relative
                if target.is_file():
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(f"{target.name}.partial")
                with self.store.open(self._uri(relative)) as source:
                    partial.write_bytes(source.read())
                partial.replace(target)
                fetched += 1
        if fetched:
            log.info("fetched %d cached soft-label and embedding files from the artifact store", fetched)
        return fetched

    def push(self) -> int:
        """Copy the job's cached files that the store lacks from the local cache to it; how many were sent."""
        sent = 0
        for folder in FOLDERS:
            if not (self.local / folder).is_dir():
                continue
            for path in sorted((self.local / folder).rglob("*.safetensors")):
                relative = path.relative_to(self.local).as_posix()
                if relative in self.stored or not self._ours(relative):
                    continue
                self.store.put_file(path, f"{self.tenant_id}/{relative}")
                self.stored.add(relative)
                sent += 1
        return sent
