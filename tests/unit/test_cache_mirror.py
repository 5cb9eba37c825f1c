"""A job's cached soft labels and reference embeddings between a worker's local cache and the artifact store
(fsspec's in-memory filesystem stands in for S3): only the job's data hashes move, and a second host's empty
cache gets them back."""

import secrets
from pathlib import Path

from app.storage import ArtifactStore
from workers.cache_mirror import CacheMirror

OURS, THEIRS = "a" * 64, "b" * 64


def _cached(cache: Path, folder: str, data_sha: str, teacher: str = "f1") -> Path:
    path = cache / folder / teacher / f"{data_sha}-len32-bi.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(secrets.token_bytes(16))
    return path


def test_push_sends_the_jobs_files_once_and_pull_restores_them_on_an_empty_cache(tmp_path: Path) -> None:
    store = ArtifactStore(f"memory://bucket-{secrets.token_hex(4)}/prefix")
    first = tmp_path / "host-1"
    ours = [_cached(first, "soft-labels", OURS), _cached(first, "embeddings", OURS)]
    _cached(first, "soft-labels", THEIRS), _cached(first, "embeddings", THEIRS)  # another job's files
    mirror = CacheMirror(store, tenant_id="ten_1", data_sha256={OURS}, cache_dir=first)
    assert mirror.pull() == 0
    assert mirror.push() == 2
    assert mirror.push() == 0, "sent again"
    assert store.list_files(store.uri("ten_1")) == [
        f"embeddings/f1/{OURS}-len32-bi.safetensors",
        f"soft-labels/f1/{OURS}-len32-bi.safetensors",
    ]

    second = tmp_path / "host-2"
    other = CacheMirror(store, tenant_id="ten_1", data_sha256={OURS}, cache_dir=second)
    assert other.pull() == 2
    for path in ours:
        assert (second / path.relative_to(first)).read_bytes() == path.read_bytes()
    assert other.push() == 0, "what came from the store goes back"
    stranger = CacheMirror(store, tenant_id="ten_2", data_sha256={OURS}, cache_dir=tmp_path / "host-3")
    assert stranger.pull() == 0, "another tenant's cached files are not shared"
