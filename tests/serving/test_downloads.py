"""The API's download cache of model folders from a remote store: bounded in bytes, least recently used evicted.

fsspec's in-memory filesystem is the remote store here; tests/integration/test_s3.py runs it against S3."""

import secrets
from pathlib import Path

from prometheus_client import REGISTRY

from app.serving.downloads import DownloadCache
from app.storage import ArtifactStore


def _stored_model(store: ArtifactStore, tmp_path: Path, name: str, size: int) -> str:
    folder = tmp_path / "src" / name
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(secrets.token_bytes(size))
    (folder / "manifest.json").write_text("{}")
    return store.put_dir(folder, f"tenant/models/{name}")


def _evictions() -> float:
    return REGISTRY.get_sample_value("qadistill_model_download_evictions_total") or 0.0


def test_least_recently_used_copies_go_beyond_the_byte_budget(tmp_path: Path) -> None:
    store = ArtifactStore(f"memory://bucket-{secrets.token_hex(4)}/prefix")
    a, b, c = (_stored_model(store, tmp_path, name, 1000) for name in ("a", "b", "c"))
    cache = DownloadCache(store, tmp_path / "cache", capacity_bytes=2100)  # two models (1002 bytes each)
    before = _evictions()

    folder_a = cache.fetch(a)
    assert (folder_a / "weights.bin").stat().st_size == 1000
    folder_b = cache.fetch(b)
    assert cache.fetch(a) == folder_a  # a hit: a is now the most recently used
    folder_c = cache.fetch(c)  # over budget: b, the least recently used, goes

    assert folder_a.is_dir() and folder_c.is_dir() and not folder_b.exists()
    assert cache.used_bytes == 2 * 1002 <= cache.capacity_bytes
    assert _evictions() == before + 1
    assert REGISTRY.get_sample_value("qadistill_model_download_cache_bytes") == cache.used_bytes
    assert (cache.fetch(b) / "manifest.json").read_text() == "{}"  # fetched again on demand
    assert not folder_a.exists(), "a was the least recently used when b came back"


def test_a_model_larger_than_the_budget_is_kept_alone(tmp_path: Path) -> None:
    store = ArtifactStore(f"memory://bucket-{secrets.token_hex(4)}/prefix")
    small, large = _stored_model(store, tmp_path, "small", 10), _stored_model(store, tmp_path, "large", 5000)
    cache = DownloadCache(store, tmp_path / "cache", capacity_bytes=1000)
    cache.fetch(small)
    folder = cache.fetch(large)
    assert folder.is_dir() and cache.used_bytes == 5002
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [folder.name]


def test_a_restart_reuses_the_copies_on_disk_and_drops_partial_ones(tmp_path: Path) -> None:
    store = ArtifactStore(f"memory://bucket-{secrets.token_hex(4)}/prefix")
    a, b = _stored_model(store, tmp_path, "a", 100), _stored_model(store, tmp_path, "b", 100)
    first = DownloadCache(store, tmp_path / "cache", capacity_bytes=10_000)
    folder_a, folder_b = first.fetch(a), first.fetch(b)
    (tmp_path / "cache" / "cut-short.partial").mkdir()

    again = DownloadCache(store, tmp_path / "cache", capacity_bytes=150)  # a smaller budget: the older goes
    assert not (tmp_path / "cache" / "cut-short.partial").exists()
    assert not folder_a.exists() and folder_b.is_dir()
    assert again.used_bytes == 102


def test_a_local_store_is_read_in_place(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    uri = _stored_model(store, tmp_path, "a", 10)
    cache = DownloadCache(store, tmp_path / "cache", capacity_bytes=0)
    assert cache.fetch(uri) == Path(uri)
    assert not (tmp_path / "cache").exists()
