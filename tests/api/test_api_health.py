"""Liveness, readiness (database and broker) and Prometheus metrics."""

from fastapi.testclient import TestClient

from app.main import create_app


def test_healthz_and_readyz(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "database": "ok", "broker": "ok", "models_loaded": 0}


def test_readyz_is_503_when_the_broker_is_down(settings):
    unreachable = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(unreachable)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["database"] == "ok" and response.json()["broker"].startswith("error")


def test_metrics_count_requests_by_route_and_jobs_by_status(client, alice):
    client.get("/v1/jobs/job_missing", headers=alice.headers)
    text = client.get("/metrics").text
    assert 'route="/v1/jobs/{job_id}"' in text and 'status="404"' in text
    assert "qadistill_http_request_seconds_bucket" in text
    assert 'qadistill_jobs{status="queued"}' in text
