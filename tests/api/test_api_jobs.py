"""Submitting, listing, cancelling and reading jobs over REST (no worker runs here: jobs stay queued)."""

import copy
import json
import secrets

import pytest
from fastapi.testclient import TestClient

from app.db.session import session_scope
from app.main import create_app
from app.services.reconcile import record_worker


def make_spec(**overrides):
    spec = {
        "name": "tiny",
        "variants": ["kd"],
        "data": {"train": "train", "eval": "eval"},
        "teachers": [{"name": "t1", "max_steps": 2}],
        "stage2": {"max_steps": 2},
    }
    spec.update(overrides)
    return spec


def submit(client, caller, spec, key=None):
    headers = dict(caller.headers)
    if key:
        headers["Idempotency-Key"] = key
    return client.post("/v1/jobs", headers=headers, json=spec)


def job_count(client, caller):
    return len(client.get("/v1/jobs", headers=caller.headers, params={"limit": 100}).json()["data"])


def test_submit_resolves_names_to_dataset_ids(client, alice, datasets):
    response = submit(client, alice, make_spec())
    assert response.status_code == 201, response.text
    job = response.json()
    assert (job["status"], job["progress"], job["error"], job["model"]) == ("queued", 0.0, None, None)
    assert job["spec"]["data"] == {
        "train": datasets["train"]["id"],
        "eval": [datasets["eval"]["id"]],
        "unlabeled": None,
    }
    got = client.get(f"/v1/jobs/{job['id']}", headers=alice.headers).json()
    assert got["id"] == job["id"] and got["status"] == "queued"


def test_a_job_can_name_several_evaluation_sets(client, alice, datasets):
    spec = make_spec(data={"train": "train", "eval": ["eval", datasets["train"]["id"]]})
    response = submit(client, alice, spec)
    assert response.status_code == 201, response.text
    assert response.json()["spec"]["data"]["eval"] == [datasets["eval"]["id"], datasets["train"]["id"]]
    # The set at fault is named by its place in the list.
    bad = submit(client, alice, make_spec(data={"train": "train", "eval": ["eval", "pool"]}))
    assert bad.status_code == 422
    assert bad.json()["error"]["param"] == "data.eval.1"
    assert "has no labels" in bad.json()["error"]["message"]
    missing = submit(client, alice, make_spec(data={"train": "train", "eval": ["eval", "nope"]}))
    assert (missing.status_code, missing.json()["error"]["param"]) == (422, "data.eval.1")
    empty = submit(client, alice, make_spec(data={"train": "train", "eval": []}))
    assert (empty.status_code, empty.json()["error"]["param"]) == (422, "data.eval")


def test_idempotency_key_returns_the_same_job(client, alice, datasets):
    first = submit(client, alice, make_spec(), key="retry-1")
    again = submit(client, alice, make_spec(), key="retry-1")
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    other_body = submit(client, alice, make_spec(seed=3), key="retry-1")
    assert other_body.status_code == 409
    assert other_body.json()["error"]["param"] == "Idempotency-Key"
    assert job_count(client, alice) == 1


def _set(spec, path, value):
    *parents, last = path.split(".")
    node = spec
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return spec


BAD_FIELDS = [
    ("name", "Not A Name", "name"),
    ("variants", ["xkd"], "variants.0"),
    ("variants", [], "variants"),
    ("variants", ["kd", "kd"], "variants"),
    ("variants", ["tmkd"], "data.unlabeled"),
    ("teachers.0.learning_rate", -1, "teachers.0.learning_rate"),
    ("teachers.0.epochs", -1, "teachers.0.epochs"),
    ("teachers.0.max_length", 4, "teachers.0.max_length"),
    ("teachers", [{"name": "t1"}, {"name": "t1"}], "teachers"),
    ("teachers", [], "teachers"),
    ("teachers", [{"name": "t1"}, {"name": "soup", "average_of": ["t1", "t9"]}], "teachers.1.average_of"),
    ("student.kind", "cnn", "student.kind"),
    ("student.layers", [], "student.layers"),
    ("student.layers", [1, 1], "student.layers"),
    ("distill.temperature", 0, "distill.temperature"),
    ("distill.alpha", 1.5, "distill.alpha"),
    ("stage1.learning_rate", 0, "stage1.learning_rate"),
    ("stage2.batch_size", 0, "stage2.batch_size"),
    ("stage2.max_steps", 0, "stage2.max_steps"),
    ("ensemble_size", 9, "ensemble_size"),
    ("seed", -1, "seed"),
    ("device", "tpu", "device"),
    ("surprise", 1, "surprise"),
    ("data.train", "no-such-dataset", "data.train"),
    ("data.eval", "pool", "data.eval"),
    ("data.train", "pool", "data.train"),
    ("teachers.0.path", "/etc", "teachers.0.path"),
    ("teachers.0.base", "/usr/lib", "teachers.0.base"),
    ("student.init_from", "/root", "student.init_from"),
    ("distill.embedding_from", "/root", "distill.embedding_from"),
    ("stage1.embedding_weight", -1, "stage1.embedding_weight"),
]


@pytest.mark.parametrize(("path", "value", "param"), BAD_FIELDS)
def test_bad_spec_field_is_422_naming_it_and_creates_nothing(client, alice, datasets, path, value, param):
    spec = _set(copy.deepcopy(make_spec()), path, value)
    response = submit(client, alice, spec)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["message"].startswith(f"{param}:")
    assert job_count(client, alice) == 0


def test_missing_required_field_and_bad_json(client, alice, datasets):
    spec = make_spec()
    del spec["teachers"]
    missing = submit(client, alice, spec)
    assert (missing.status_code, missing.json()["error"]["param"]) == (422, "teachers")
    garbled = client.post(
        "/v1/jobs", headers={**alice.headers, "Content-Type": "application/json"}, content=b"{not json"
    )
    assert garbled.status_code == 422
    assert job_count(client, alice) == 0


def test_oversized_job_body_is_refused_naming_the_body(client, alice, datasets, settings):
    spec = make_spec()
    spec["padding"] = "x" * (settings.max_request_bytes + 1)
    response = submit(client, alice, spec)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "body"
    assert job_count(client, alice) == 0


def test_cursor_pagination_and_status_filter(client, alice, datasets):
    ids = [submit(client, alice, make_spec(seed=i)).json()["id"] for i in range(4)]  # the default quota
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=alice.headers)
    seen, cursor = [], None
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/jobs", headers=alice.headers, params=params).json()
        assert len(page["data"]) <= 3
        seen += [j["id"] for j in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    cancelled = client.get("/v1/jobs", headers=alice.headers, params={"status": "cancelled"}).json()
    assert [j["id"] for j in cancelled["data"]] == [ids[0]]
    bad_cursor = client.get("/v1/jobs", headers=alice.headers, params={"cursor": "nonsense!"})
    assert (bad_cursor.status_code, bad_cursor.json()["error"]["param"]) == (400, "cursor")
    bad_status = client.get("/v1/jobs", headers=alice.headers, params={"status": "sleeping"})
    assert (bad_status.status_code, bad_status.json()["error"]["param"]) == (422, "status")


def test_cancel_queued_job_at_once(client, alice, datasets):
    job = submit(client, alice, make_spec()).json()
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice.headers)
    assert cancelled.status_code == 200
    body = cancelled.json()
    assert (body["status"], body["cancel_requested"]) == ("cancelled", True)
    assert body["finished_at"] is not None
    again = client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice.headers)
    assert again.json()["status"] == "cancelled"
    events = client.get(f"/v1/jobs/{job['id']}/events", headers=alice.headers).json()
    assert events["finished"] is True
    messages = [e["message"] for e in events["data"]]
    # No worker runs in these tests: the job said it waits for one.
    assert messages[0].startswith("job submitted to queue 'cpu' by request "), messages
    assert messages[-1] == "cancelled before it started"
    assert messages[1].startswith("no live worker consumes queue 'cpu'"), messages


def test_follow_streams_events_then_ends(client, alice, datasets):
    job = submit(client, alice, make_spec()).json()
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice.headers)
    url = f"/v1/jobs/{job['id']}/events"
    with client.stream("GET", url, headers=alice.headers, params={"follow": "true"}) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        text = "".join(stream.iter_text())
    names = [line.removeprefix("event: ").strip() for line in text.splitlines() if line.startswith("event:")]
    assert names == ["job_event"] * 3 + ["end"]  # submitted, waiting for a worker, cancelled
    end = [line for line in text.splitlines() if line.startswith("data:")][-1]
    assert json.loads(end.removeprefix("data:"))["status"] == "cancelled"


def test_dataset_in_use_cannot_be_deleted(client, alice, datasets):
    job = submit(client, alice, make_spec()).json()
    refused = client.delete(f"/v1/datasets/{datasets['train']['id']}", headers=alice.headers)
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "dataset_in_use"
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice.headers)
    assert client.delete(f"/v1/datasets/{datasets['train']['id']}", headers=alice.headers).status_code == 204


def test_metrics_of_a_queued_job_are_empty(client, alice, datasets):
    job = submit(client, alice, make_spec()).json()
    assert client.get(f"/v1/jobs/{job['id']}/metrics", headers=alice.headers).json() == {
        "curves": [],
        "final": None,
    }


def test_other_tenant_gets_404_everywhere(client, alice, bob, datasets):
    job = submit(client, alice, make_spec()).json()
    for method, suffix in (("get", ""), ("post", "/cancel"), ("get", "/events"), ("get", "/metrics")):
        response = getattr(client, method)(f"/v1/jobs/{job['id']}{suffix}", headers=bob.headers)
        assert response.status_code == 404, suffix
    assert client.get("/v1/jobs", headers=bob.headers).json()["data"] == []
    borrowing = submit(client, bob, make_spec(data={"train": datasets["train"]["id"], "eval": "eval"}))
    assert (borrowing.status_code, borrowing.json()["error"]["param"]) == (422, "data.train")
    assert client.get(f"/v1/jobs/{job['id']}", headers=alice.headers).json()["status"] == "queued"


def test_unreachable_queue_is_503_and_leaves_no_job(client, alice, datasets, settings):
    down = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(down)) as cut_off:
        response = submit(cut_off, alice, make_spec(), key="during-outage")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "queue_unavailable"
    assert job_count(client, alice) == 0
    assert submit(client, alice, make_spec(), key="during-outage").status_code == 201


def test_past_the_quota_a_job_is_429_with_retry_after_until_one_ends(client, alice, datasets, settings):
    quota = settings.max_active_jobs
    first = submit(client, alice, make_spec(seed=0), key="first").json()
    for seed in range(1, quota):
        assert submit(client, alice, make_spec(seed=seed)).status_code == 201
    refused = submit(client, alice, make_spec(seed=quota))
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["Retry-After"]) > 0
    assert refused.json()["error"]["code"] == "quota_exceeded"
    assert job_count(client, alice) == quota
    retried = submit(client, alice, make_spec(seed=0), key="first")
    assert (retried.status_code, retried.json()["id"]) == (200, first["id"]), "a retry is not a new job"
    client.post(f"/v1/jobs/{first['id']}/cancel", headers=alice.headers)
    assert submit(client, alice, make_spec(seed=quota)).status_code == 201


def test_one_tenants_quota_does_not_limit_another(client, alice, bob, datasets, upload, pairs_jsonl, settings):
    for seed in range(settings.max_active_jobs):
        submit(client, alice, make_spec(seed=seed))
    upload(bob, pairs_jsonl(4, "bt"), name="train")
    upload(bob, pairs_jsonl(3, "be"), name="eval")
    assert submit(client, bob, make_spec()).status_code == 201


def test_what_would_fail_late_is_422_at_submit(client, alice, datasets, settings, tmp_path, monkeypatch):
    # all-MiniLM-L6-v2 (the default student init_from) has 6 layers: 0 to 5.
    too_deep = submit(client, alice, make_spec(student={"layers": [0, 99]}))
    assert (too_deep.status_code, too_deep.json()["error"]["param"]) == (422, "student.layers"), too_deep.text
    assert "6 layers" in too_deep.json()["error"]["message"]
    assert submit(client, alice, make_spec(student={"layers": [0, 5]})).status_code == 201

    # No worker has reported a GPU: the cuda job is taken, and says what it waits for.
    cuda = submit(client, alice, make_spec(device="cuda"))
    assert cuda.status_code == 201, cuda.text
    assert (cuda.json()["queue"], cuda.json()["stage"]) == ("gpu", "waiting_for_gpu_worker")

    monkeypatch.setattr(settings, "model_dirs", [tmp_path])
    missing = str(tmp_path / "no-such-model")
    gone = submit(client, alice, make_spec(teachers=[{"name": "t1", "path": missing}]))
    assert (gone.status_code, gone.json()["error"]["param"]) == (422, "teachers.0.path"), gone.text
    student = submit(client, alice, make_spec(student={"init_from": missing}))
    assert (student.status_code, student.json()["error"]["param"]) == (422, "student.init_from")
    reference = submit(client, alice, make_spec(distill={"embedding_from": missing}))
    assert (reference.status_code, reference.json()["error"]["param"]) == (422, "distill.embedding_from")

    # Once a GPU worker reports in, cuda and auto jobs go to its queue, waiting for nothing.
    with session_scope(settings.database_url) as session:
        record_worker(session, name=f"gpu-host:{secrets.token_hex(3)}", gpu=True, queues=["gpu"])
    for device in ("cuda", "auto"):
        job = submit(client, alice, make_spec(device=device)).json()
        assert (job["queue"], job["stage"]) == ("gpu", None), job
    assert job_count(client, alice) == 4
