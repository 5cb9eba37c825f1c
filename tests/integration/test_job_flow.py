"""A user's whole flow against a real worker, on PostgreSQL + Redis and in embedded mode."""

import json
import secrets
from pathlib import Path

import pytest

from app.db.session import session_scope
from app.services import registry
from app.services.demo import DEMO_FILE
from tests.integration.flow_helpers import follow_events, tiny_spec, unlabelled_slice, upload
from workers.runner import execute_job

pytestmark = pytest.mark.integration


def test_submit_follow_and_read_metrics_and_model(stack, tiny_base, sample_data):
    alice = stack.caller(f"alice-{secrets.token_hex(3)}")
    upload(stack, alice, DEMO_FILE.read_bytes(), "demo")
    upload(stack, alice, unlabelled_slice(sample_data), "pool")
    spec = tiny_spec(tiny_base)
    headers = {**alice.headers, "Idempotency-Key": "first-try"}
    submitted = stack.client.post("/v1/jobs", headers=headers, json=spec)
    assert submitted.status_code == 201, submitted.text
    job_id = submitted.json()["id"]
    retried = stack.client.post("/v1/jobs", headers=headers, json=spec)
    assert (retried.status_code, retried.json()["id"]) == (200, job_id)

    messages = follow_events(stack, alice, job_id)
    event_texts = [data["message"] for event, data in messages if event == "job_event"]
    end_event, end = messages[-1]
    assert end_event == "end", stack.worker_log.read_text()[-3000:]
    assert end["status"] == "succeeded", (end, stack.worker_log.read_text()[-3000:])
    assert "started" in event_texts and any(m.startswith("succeeded") for m in event_texts)
    assert not [m for m in event_texts if str(stack.settings.home.resolve()) in m or alice.tenant_id in m]
    assert end["progress"] == 1.0 and end["error"] is None
    assert end["model"] == {"name": "faq", "version": 1}
    assert end["started_at"] <= end["finished_at"]

    metrics = stack.client.get(f"/v1/jobs/{job_id}/metrics", headers=alice.headers).json()
    curves = {(c["stage"], c["name"]): c for c in metrics["curves"]}
    assert ("stage1:tmkd", "loss") in curves and ("stage2:kd", "loss") in curves
    loss = curves[("stage2:tmkd", "loss")]
    assert loss["steps"] == sorted(loss["steps"]) and len(loss["steps"]) == len(loss["values"])
    rows = {row["model"]: row for row in metrics["final"]["rows"]}
    assert {"kd", "tmkd", "teacher:t1", "teacher:t2"} <= set(rows)
    assert 0.0 <= rows["tmkd"]["map"] <= 1.0

    version = stack.client.get("/v1/models/faq", headers=alice.headers).json()
    assert (version["version"], version["job_id"]) == (1, job_id)
    assert "artifact_uri" not in version and alice.tenant_id not in json.dumps(version)
    with session_scope(stack.settings.database_url) as session:
        artifact_uri = registry.get_version(session, tenant_id=alice.tenant_id, name="faq", version=1).artifact_uri
    manifest = json.loads((Path(artifact_uri) / "manifest.json").read_text())
    assert manifest["variant"] == "tmkd" and manifest["heads"] == ["t1", "t2"]
    serving = manifest["serving"]
    assert serving["backend"] in {"torch-fp32", "torch-int8", "onnx-fp32", "onnx-int8"}
    assert serving["map_backend"] >= serving["map_fp32"] - 0.005

    # The registered version answers over REST, and readiness then lists it as loaded.
    passages = ["bees make honey from nectar.", "the train leaves at noon.", "honey is sweet."]
    answer = stack.client.post(
        "/v1/models/faq/answer", headers=alice.headers, json={"question": "what do bees make?", "passages": passages}
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == {"name": "faq", "version": 1}
    assert sorted(a["index"] for a in answer.json()["answers"]) == [0, 1, 2]
    assert stack.client.get("/readyz").json()["models_loaded"] == 1

    # A redelivered task for a finished job changes nothing.
    assert execute_job(job_id, stack.settings) == "skipped"
    listed = stack.client.get("/v1/models", headers=alice.headers).json()["data"]
    assert [v["version"] for v in listed] == [1]

    bob = stack.caller(f"bob-{secrets.token_hex(3)}")
    assert stack.client.get("/v1/models/faq", headers=bob.headers).status_code == 404
    assert stack.client.get(f"/v1/jobs/{job_id}/metrics", headers=bob.headers).status_code == 404


def test_cancel_a_running_job(stack, tiny_base):
    carol = stack.caller(f"carol-{secrets.token_hex(3)}")
    upload(stack, carol, DEMO_FILE.read_bytes(), "demo")
    # A teacher that trains (from the tiny base) for far longer than the test waits.
    slow_teacher = {"name": "slow", "base": str(tiny_base), "max_length": 32, "batch_size": 4, "epochs": 50}
    spec = tiny_spec(tiny_base, name="slow", variants=["kd"], teachers=[slow_teacher])
    spec["data"] = {"train": "demo", "eval": "demo"}
    job_id = stack.client.post("/v1/jobs", headers=carol.headers, json=spec).json()["id"]
    stack.wait_for(carol, job_id, lambda j: (j["stage"] or "").startswith("teacher:") and j["progress"] > 0)

    cancelling = stack.client.post(f"/v1/jobs/{job_id}/cancel", headers=carol.headers).json()
    assert cancelling["status"] == "cancelling" and cancelling["cancel_requested"]
    job = stack.wait_for(carol, job_id, lambda j: j["status"] != "cancelling", timeout=30)
    assert job["status"] == "cancelled" and job["finished_at"] is not None
    events = stack.client.get(f"/v1/jobs/{job_id}/events", headers=carol.headers).json()
    assert "cancel requested" in [e["message"] for e in events["data"]]
    assert stack.client.get("/v1/models/slow", headers=carol.headers).status_code == 404
    freed = stack.client.delete("/v1/datasets/demo", headers=carol.headers)
    assert freed.status_code == 204


def test_pipeline_failure_is_stored_on_the_job(stack, tiny_base):
    dave = stack.caller(f"dave-{secrets.token_hex(3)}")
    upload(stack, dave, DEMO_FILE.read_bytes(), "demo")
    # A folder that passes the checks at submit (it has a config.json) but holds no weights: fails at run time.
    broken = tiny_base.parent / "weightless-model"
    broken.mkdir(exist_ok=True)
    (broken / "config.json").write_text((tiny_base / "config.json").read_text())
    spec = tiny_spec(tiny_base, name="broken", variants=["kd"], teachers=[{"name": "gone", "path": str(broken)}])
    spec["data"] = {"train": "demo", "eval": "demo"}
    job_id = stack.client.post("/v1/jobs", headers=dave.headers, json=spec).json()["id"]
    job = stack.wait_for(dave, job_id, lambda j: j["status"] in ("succeeded", "failed", "cancelled"))
    assert job["status"] == "failed"
    assert job["error"]["code"] and job["error"]["message"]
    assert stack.client.get(f"/v1/jobs/{job_id}/metrics", headers=dave.headers).json()["final"] is None
