"""The artifact store on a local folder and on a remote filesystem (fsspec's in-memory one stands in for S3)."""

import secrets
from pathlib import Path

import pytest

from app.storage import ArtifactStore


@pytest.fixture(params=["local", "remote"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return ArtifactStore(str(tmp_path / "store"))
    return ArtifactStore(f"memory://bucket-{secrets.token_hex(4)}/prefix")


def test_files_and_folders_round_trip(store: ArtifactStore, tmp_path: Path) -> None:
    source = tmp_path / "model"
    (source / "member-0").mkdir(parents=True)
    (source / "manifest.json").write_text('{"format": "x"}')
    (source / "member-0" / "weights.bin").write_bytes(b"\x00\x01")
    uri = store.put_dir(source, "tenant/models/job-1")
    local = store.local_dir(uri, tmp_path / "cache")
    assert (local / "manifest.json").read_text() == '{"format": "x"}'
    assert (local / "member-0" / "weights.bin").read_bytes() == b"\x00\x01"

    data = tmp_path / "pairs.jsonl"
    data.write_text("{}\n")
    file_uri = store.put_file(data, "tenant/datasets/abc.jsonl")
    assert store.local_file(file_uri, tmp_path / "cache").read_text() == "{}\n"
    with store.open(file_uri) as handle:
        assert handle.read() == b"{}\n"

    store.delete(uri)
    store.delete(file_uri)
    assert not store.exists(uri) and not store.exists(file_uri)
    store.delete(file_uri)  # deleting twice is fine


def test_put_dir_replaces_the_previous_content(store: ArtifactStore, tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    (first / "old.txt").write_text("old")
    (second / "new.txt").write_text("new")
    store.put_dir(first, "k")
    uri = store.put_dir(second, "k")
    listed = {Path(p).name for p in store.fs.find(store.fs._strip_protocol(uri))}
    assert listed == {"new.txt"}
