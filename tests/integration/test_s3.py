"""The artifact store on S3 end to end, against moto's S3-compatible HTTP server started here: a whole job with
every artifact in the bucket and none on a local disk, and a job resumed by a worker on an empty disk."""

import os
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import s3fs

from app.embedded import start_worker
from app.services.demo import DEMO_FILE
from app.storage import ArtifactStore
from tests.integration.conftest import FINISHED, Stack, _run_stack
from tests.integration.flow_helpers import tiny_spec, unlabelled_slice, upload
from tests.integration.test_leases import kill_lease_holder, messages, wait_until
from tests.servers import MotoS3
from workers.workspace import CURRENT, teacher_key

pytestmark = pytest.mark.integration

BUCKET = "qadistill-it"
LEASE_S = 5.0


@pytest.fixture(scope="module")
def s3_url() -> Iterator[str]:
    """A bucket on a fresh moto server; the AWS variables point this process and its children at it."""
    server = MotoS3()
    server.start()
    saved = {name: os.environ.get(name) for name in server.env}
    os.environ.update(server.env)
    try:
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(BUCKET)
        yield f"s3://{BUCKET}/qadistill"
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


@pytest.fixture(scope="module")
def s3_stack(s3_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """PostgreSQL, Redis and a worker whose artifacts are all in the bucket; short leases, every checkpoint
    copied; workers a test adds are killed at the end."""
    home = tmp_path_factory.mktemp("s3")
    overrides = {"artifacts_url": s3_url, "lease_s": LEASE_S, "checkpoint_sync_s": 0.0, "requeue_after_s": 4.0}
    for stack in _run_stack("postgres", home, **overrides):
        stack.spares = []  # type: ignore[attr-defined]
        try:
            yield stack
        finally:
            for worker in stack.spares:  # type: ignore[attr-defined]
                if worker.poll() is None:
                    os.killpg(worker.pid, signal.SIGKILL)
                    worker.wait(timeout=30)


def stored_keys(stack: Stack, tenant_id: str) -> list[str]:
    store = ArtifactStore(stack.settings.artifacts_url)
    return store.list_files(store.uri(tenant_id))


def test_a_whole_job_keeps_every_artifact_in_the_bucket(s3_stack, tiny_base, sample_data):
    stack = s3_stack
    alice = stack.caller(f"alice-{secrets.token_hex(3)}")
    upload(stack, alice, DEMO_FILE.read_bytes(), "demo")
    upload(stack, alice, unlabelled_slice(sample_data), "pool")
    job_id = stack.client.post("/v1/jobs", headers=alice.headers, json=tiny_spec(tiny_base, name="s3job")).json()["id"]
    job = stack.wait_for(alice, job_id, lambda j: j["status"] in FINISHED, timeout=240)
    assert job["status"] == "succeeded", (job, stack.worker_log.read_text()[-3000:])

    keys = stored_keys(stack, alice.tenant_id)
    assert len([k for k in keys if k.startswith("datasets/")]) == 2, keys
    # Bi-encoder teachers' soft labels are cosines of their embeddings. Both teachers are one folder, and "demo" is
    # both the train and the eval set: its vectors of "demo" and "pool" at the teachers' 32 tokens, and at 128 those
    # the student's embedding term matches (stages 1 and 2), the base's floor on "demo" being one of them.
    embeddings = [k for k in keys if k.startswith("embeddings/") and k.endswith(".safetensors")]
    assert len([k for k in embeddings if k.endswith("-len32.safetensors")]) == 2, keys
    assert len([k for k in embeddings if k.endswith("-len128.safetensors")]) == 2, keys
    assert f"models/{job_id}/manifest.json" in keys, keys
    # The worker deletes the snapshots right after it marks the job succeeded.
    wait_until(lambda: not [k for k in stored_keys(stack, alice.tenant_id) if k.startswith("jobs/")], 15,
               "the finished job's snapshots to be deleted from the bucket")  # fmt: skip
    assert not (stack.settings.home / "artifacts").exists(), "an artifact landed on the local disk"

    # The API serves the model from the bucket through its download cache.
    body = {"question": "what do bees make?", "passages": ["the sky is blue.", "bees make honey."]}
    answer = stack.client.post("/v1/models/s3job/answer", headers=alice.headers, json=body)
    assert answer.status_code == 200, answer.text
    assert stack.settings.cache_dir is not None
    assert len(list((stack.settings.cache_dir / "models").iterdir())) == 1
    assert "qadistill_model_download_cache_bytes" in stack.client.get("/metrics").text


def test_a_worker_with_an_empty_disk_resumes_a_job_from_the_bucket(s3_stack, tiny_base, tmp_path: Path):
    stack = s3_stack
    erin = stack.caller(f"erin-{secrets.token_hex(3)}")
    upload(stack, erin, DEMO_FILE.read_bytes(), "demo")
    # Long enough (400 steps) to be still training when the second worker is up.
    teacher = {"name": "long", "base": str(tiny_base), "max_length": 32, "batch_size": 4, "epochs": 50}
    teacher["max_steps"] = 400
    spec = tiny_spec(tiny_base, name="resumed", variants=["kd"], teachers=[teacher], checkpoint_every=10)
    spec["data"] = {"train": "demo", "eval": "demo"}
    job_id = stack.client.post("/v1/jobs", headers=erin.headers, json=spec).json()["id"]

    store = ArtifactStore(stack.settings.artifacts_url)
    teacher_work = store.uri(teacher_key(erin.tenant_id, job_id, "long"))

    def stored_checkpoint() -> bool:
        current = store.read_text(f"{teacher_work}/{CURRENT}")
        folder = f"{teacher_work}/{current}/checkpoints/teacher/long"
        return current is not None and any(n.startswith("step-") for n in store.list_names(folder))

    wait_until(stored_checkpoint, 120, "a teacher checkpoint in the bucket", stack.worker_log)
    # A second host: its own empty home (no cache, no work folder), the same database, broker and bucket.
    other_home = tmp_path / "other-host"
    other = stack.settings.model_copy(
        update={"home": other_home, "cache_dir": other_home / "cache", "work_dir": other_home / "work"}
    )
    other_home.mkdir()
    other_log = tmp_path / "other-worker.log"
    spare = start_worker(other, log_path=other_log, extra_env={"OMP_NUM_THREADS": "1"})
    stack.spares.append(spare)  # type: ignore[attr-defined]
    wait_until(lambda: "ready" in other_log.read_text(), 90, "the second worker to start", other_log)
    assert kill_lease_holder(stack, job_id) is spare, "the first worker did not hold the job"

    job = stack.wait_for(erin, job_id, lambda j: j["status"] in FINISHED, timeout=240)
    assert job["status"] == "succeeded", (job, other_log.read_text()[-3000:])
    texts = messages(stack, erin, job_id)
    assert "restored the checkpoints of the previous run from the artifact store" in texts
    assert any(m.startswith("resuming from the checkpoint") for m in texts), texts
    assert not (other_home / "artifacts").exists() and not (stack.settings.home / "artifacts").exists()
    assert f"models/{job_id}/manifest.json" in stored_keys(stack, erin.tenant_id)
