"""What an operator sees of a tiny job: the worker's and the api's Prometheus metrics, the request id from the
submitting request to the job's events, and a worker log with each event once and no third-party noise."""

import json
import secrets
from collections.abc import Iterator

import httpx
import pytest

from app.services.demo import DEMO_FILE
from tests.integration.conftest import FINISHED, Stack, _run_stack
from tests.integration.flow_helpers import follow_events, tiny_spec, unlabelled_slice, upload
from tests.integration.test_leases import wait_until
from tests.servers import free_port
from tests.service import embedded_service

pytestmark = pytest.mark.integration

METRICS_KEY = "operator-metrics-key"
REQUEST_ID = "req-observability-42"


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The production stack with a worker serving its metrics on a free port, and a metrics key for the api."""
    home = tmp_path_factory.mktemp("observability")
    yield from _run_stack("postgres", home, worker_metrics_port=free_port(), metrics_key=METRICS_KEY)


@pytest.fixture(scope="module")
def finished_job(observed: Stack, tiny_base, sample_data) -> tuple[Stack, object, str]:
    """A tiny job submitted with a request id of the caller's, run to its end."""
    stack = observed
    alice = stack.caller(f"alice-{secrets.token_hex(3)}")
    upload(stack, alice, DEMO_FILE.read_bytes(), "demo")
    upload(stack, alice, unlabelled_slice(sample_data), "pool")
    headers = {**alice.headers, "X-Request-ID": REQUEST_ID}
    submitted = stack.client.post("/v1/jobs", headers=headers, json=tiny_spec(tiny_base, name="observed"))
    assert submitted.status_code == 201, submitted.text
    assert submitted.headers["X-Request-ID"] == REQUEST_ID
    job_id = submitted.json()["id"]
    job = stack.wait_for(alice, job_id, lambda j: j["status"] in FINISHED, timeout=240)
    assert job["status"] == "succeeded", (job, stack.worker_log.read_text()[-3000:])
    return stack, alice, job_id


def samples(text: str) -> dict[str, float]:
    """Prometheus text format: {'name{labels}': value}."""
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            found[series] = float(value)
    return found


def test_the_workers_metrics_time_the_job_and_its_stages(finished_job):
    stack, _, _ = finished_job
    url = f"http://127.0.0.1:{stack.settings.worker_metrics_port}/metrics"
    found: dict[str, float] = {}

    def value(prefix: str, *labels: str) -> float:
        return sum(v for k, v in found.items() if k.startswith(prefix) and all(label in k for label in labels))

    def task_ended() -> bool:  # the task ends a moment after it marks the job succeeded
        found.clear()
        found.update(samples(httpx.get(url, timeout=10).text))
        return value("qadistill_worker_tasks_running{") == 0

    wait_until(task_ended, 30, "the worker's task to end")
    scraped = httpx.get(url, timeout=10).text
    assert value("qadistill_worker_jobs_total{", 'status="succeeded"') == 1, scraped
    assert value("qadistill_worker_job_seconds_count{", 'status="succeeded"') == 1
    assert value("qadistill_worker_job_seconds_sum{", 'status="succeeded"') > 0
    for stage in ("prepare", "soft_labels", "stage1", "stage2", "evaluate"):
        assert value("qadistill_worker_stage_seconds_count{", f'stage="{stage}"') >= 1, (stage, scraped)
    assert value("qadistill_worker_tasks_total{", 'task="run_job"', 'outcome="succeeded"') == 1
    assert value("qadistill_queue_depth{", 'queue="') == 0 and "qadistill_queue_depth{queue=" in scraped, scraped
    assert found["qadistill_worker_heartbeat_timestamp_seconds"] > 0
    assert "alice" not in scraped and "observed" not in scraped, "a tenant's names in the worker's metrics"


def test_the_apis_metrics_time_loads_and_answers_by_model_only_with_the_key(finished_job):
    stack, alice, job_id = finished_job
    body = {"question": "what do bees make?", "passages": ["the sky is blue.", "bees make honey."]}
    assert stack.client.post("/v1/models/observed/answer", headers=alice.headers, json=body).status_code == 200
    events = '{method="GET",route="/v1/jobs/{job_id}/events"}'
    timed, counted = f"qadistill_http_request_seconds_count{events}", "qadistill_http_requests_total{" + events[1:-1]
    before = samples(stack.client.get("/metrics").text)
    follow_events(stack, alice, job_id)  # an event stream, which the request histogram leaves out
    after = samples(stack.client.get("/metrics").text)
    assert after.get(timed) == before.get(timed), "an SSE stream timed as a request"
    assert after[f'{counted},status="200"}}'] == before.get(f'{counted},status="200"}}', 0) + 1, "and still counted"

    public = stack.client.get("/metrics").text
    keyed = stack.client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"}).text
    api_metrics = (
        "qadistill_model_load_seconds_count",
        "qadistill_model_cache_bytes",
        "qadistill_model_cache_evictions",
        "qadistill_answer_latency_seconds_count",
        "qadistill_model_download_evictions",
    )
    for name in api_metrics:
        assert name in public, name
    by_model = 'qadistill_model_answer_latency_seconds_count{model="observed",version="1"}'
    assert by_model not in public and 'model="' not in public and by_model in keyed


def test_the_request_id_reaches_the_jobs_events(finished_job):
    stack, alice, job_id = finished_job
    events = stack.client.get(f"/v1/jobs/{job_id}/events", headers=alice.headers).json()["data"]
    assert any(REQUEST_ID in e["message"] for e in events), [e["message"] for e in events]
    answer = stack.client.get("/healthz")
    assert len(answer.headers["X-Request-ID"]) >= 16, "a request without one gets a new id"


def test_the_worker_logs_each_event_once_and_no_third_party_noise(finished_job):
    stack, _, job_id = finished_job
    text = stack.worker_log.read_text()
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    mine = [r for r in records if r.get("job_id") == job_id]
    assert len(mine) >= 10, text[-3000:]
    said = [r["message"].split(" ", 2)[2] for r in mine]  # "job <id> [stage] message": what another log repeats
    for record, message in zip(mine, said, strict=True):
        assert record["process"] == "worker" and record["level"] and record["time"]
        # Two teachers on one folder have the same events: each line once per event, not once per logger.
        assert sum(message in line for line in text.splitlines()) == said.count(message), f"logged twice: {message}"
    assert "LOAD REPORT" not in text and "it/s]" not in text and not any(
        r["logger"].startswith(("transformers", "celery.redirected")) for r in records
    ), text[-3000:]


def test_the_api_process_logs_its_own_lines_as_json_with_the_request_id(tmp_path):
    with embedded_service(tmp_path / "home") as service:
        upload = httpx.post(
            f"{service.url}/v1/datasets",
            headers={"Authorization": f"Bearer {service.key}", "X-Request-ID": REQUEST_ID},
            files={"file": ("pairs.jsonl", b"".join(DEMO_FILE.read_bytes().splitlines(keepends=True)[:20]))},
            data={"name": "logged"},
            timeout=30,
        )
        assert upload.status_code == 201, upload.text
        assert upload.headers["X-Request-ID"] == REQUEST_ID
    log = (tmp_path / "home-service.log").read_text()
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    api = [r for r in records if r["process"] == "api"]
    assert any(r["logger"] == "app.main" and r["message"].startswith("api ready") for r in api), log[-3000:]
    stored = [r for r in api if r["logger"] == "app.services.datasets" and "(20 pairs)" in r["message"]]
    assert [r.get("request_id") for r in stored] == [REQUEST_ID], log[-3000:]
