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


def test_job_workspace_snapshots_round_trip(store: ArtifactStore, tmp_path: Path) -> None:
    from workers.workspace import Workspace

    local = tmp_path / "run-1"
    first = Workspace(store, key="tenant/jobs/j/work", local=local, epoch=1, every_s=0, still_leased=lambda: None)
    assert not first.restore()
    (local / "checkpoints" / "step-2").mkdir(parents=True)
    (local / "checkpoints" / "step-2" / "model.safetensors").write_bytes(b"w2")
    first.sync()
    (local / "checkpoints" / "latest").write_text("step-2")
    first.sync()
    assert store.list_names(store.uri("tenant/jobs/j/work")) == ["CURRENT", "snap-0001-000002"]

    taker = Workspace(store, key="tenant/jobs/j/work", local=tmp_path / "run-2", epoch=2, every_s=0,
                      still_leased=lambda: None)  # fmt: skip
    assert taker.restore()
    assert (taker.local / "checkpoints" / "latest").read_text() == "step-2"
    assert (taker.local / "checkpoints" / "step-2" / "model.safetensors").read_bytes() == b"w2"


def test_a_workspace_that_lost_its_lease_leaves_no_snapshot_behind(store: ArtifactStore, tmp_path: Path) -> None:
    from app.services.job_runs import LeaseLost
    from workers.workspace import Workspace

    checks = {"n": 0}

    def lost_while_copying() -> None:  # leased before the copy, lost by the time it is done
        checks["n"] += 1
        if checks["n"] > 1:
            raise LeaseLost("lease 2 lost")

    local = tmp_path / "run"
    workspace = Workspace(store, key="t/jobs/j/teacher", local=local, epoch=2, every_s=0,
                          still_leased=lost_while_copying)  # fmt: skip
    workspace.restore()
    (local / "step-1").mkdir()
    (local / "step-1" / "model.safetensors").write_bytes(b"w")
    with pytest.raises(LeaseLost):
        workspace.sync()
    assert store.list_names(store.uri("t/jobs/j/teacher")) == []

    checks["n"] = 1  # lost before the copy: nothing is copied at all
    with pytest.raises(LeaseLost):
        workspace.sync()
    assert store.list_names(store.uri("t/jobs/j/teacher")) == []
