"""Nothing leaks between tenants: unauthenticated routes name no tenant's models or jobs, and what a tenant
reads (events, errors, reports, model versions) names no server path, database address or tenant id."""

import json

import pytest

from app.db.session import session_scope
from app.services import job_runs
from app.services.redact import redact_text
from app.services.registry import register_version
from tests.api.test_api_jobs import make_spec, submit

SECRET_MODEL = "alice-secret-model"


def test_readyz_and_metrics_name_no_tenant_model_or_job(client, alice, datasets, settings):
    with session_scope(settings.database_url) as session:
        register_version(
            session, tenant_id=alice.tenant_id, name=SECRET_MODEL, job_id=None, artifact_uri="/srv/m", metrics={}
        )
    job = submit(client, alice, make_spec()).json()
    for route in ("/readyz", "/metrics", "/healthz"):
        text = client.get(route).text
        for secret in (SECRET_MODEL, alice.tenant_id, job["id"], "tenant=", "model="):
            assert secret not in text, (route, secret)
    scraped = client.get("/metrics").text
    assert 'qadistill_jobs{status="queued"}' in scraped, "aggregate job counts stay"


def test_job_events_and_errors_show_no_server_paths_addresses_or_tenant_ids(client, alice, datasets, settings):
    job_id = submit(client, alice, make_spec()).json()["id"]
    job_folder = settings.work_dir / job_id
    with session_scope(settings.database_url) as session:  # what a worker writes
        job_runs.add_event(session, job_id=job_id, stage="teacher:t1", message=f"saved to {job_folder}/teachers/t1")
        job_runs.add_event(
            session, job_id=job_id, stage="soft_labels", message=f"cached into {settings.cache_dir}/soft/ab12.npy"
        )
        job_runs.finish_job(
            session,
            job_id=job_id,
            status="failed",
            message='OperationalError: connection to server at "10.20.30.40", port 5432 failed: Connection refused '
            f"(while copying {settings.artifacts_url}/{alice.tenant_id}/models/{job_id})",
            error_code="pipeline_error",
        )
    got = client.get(f"/v1/jobs/{job_id}", headers=alice.headers).json()
    events = client.get(f"/v1/jobs/{job_id}/events", headers=alice.headers).json()["data"]
    with client.stream("GET", f"/v1/jobs/{job_id}/events?follow=true", headers=alice.headers) as stream:
        streamed = "".join(stream.iter_text())
    for shown in (json.dumps(got["error"]), json.dumps(events), streamed):
        for secret in (str(settings.home), "10.20.30.40", "5432", alice.tenant_id):
            assert secret not in shown, (secret, shown)
    messages = [e["message"] for e in events]
    assert "saved to teachers/t1" in messages, "the part inside the job's folder still tells which teacher"
    assert got["error"]["code"] == "pipeline_error" and "Connection refused" in got["error"]["message"]


def test_model_versions_and_reports_show_no_artifact_path_or_tenant_id(client, alice, datasets, settings):
    job_id = submit(client, alice, make_spec()).json()["id"]
    where = f"{settings.artifacts_url}/{alice.tenant_id}/models/{job_id}"
    report = {"rows": [], "serving": {"onnx-int8": {"error": f"FileNotFoundError: {where}/model.onnx"}}}
    with session_scope(settings.database_url) as session:
        register_version(
            session, tenant_id=alice.tenant_id, name="faq", job_id=job_id, artifact_uri=where, metrics=report
        )
        job_runs.finish_job(session, job_id=job_id, status="succeeded", message="registered faq:1", report=report)
    shown = [
        client.get("/v1/models/faq", headers=alice.headers).json(),
        client.get("/v1/models/faq/versions/1", headers=alice.headers).json(),
        client.get("/v1/models", headers=alice.headers).json()["data"][0],
        client.get(f"/v1/jobs/{job_id}/metrics", headers=alice.headers).json(),
    ]
    for body in shown:
        text = json.dumps(body)
        assert "artifact_uri" not in text and str(settings.home) not in text and alice.tenant_id not in text, text
    assert shown[0]["metrics"]["serving"]["onnx-int8"]["error"] == "FileNotFoundError: model.onnx"


@pytest.mark.parametrize(
    "kept",
    ["registered faq:12", "MAP 0.6380, MRR 0.7010", "1/2 and/or", "stage2:tmkd/member-0", "data.train: line 3"],
)
def test_redaction_keeps_ordinary_messages(kept):
    assert redact_text(kept) == kept


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("Error 111 connecting to redis.internal:6379. Connection refused.", "connecting to <address>."),
        ("postgresql+psycopg://qd:secret@db:5432/qadistill is down", "<address> is down"),
        ('connection to server on socket "/run/postgresql/.s.PGSQL.5432" failed', '".../.s.PGSQL.5432"'),
        ("s3://bucket/prefix/ten_0123456789abcdef01234567/models", "<address>"),
        ("owner ten_0123456789abcdef01234567", "owner <tenant>"),
    ],
)
def test_redaction_hides_addresses_and_tenant_ids(text, shown):
    assert shown in redact_text(text)
    assert "secret" not in redact_text(text) and "0123456789abcdef" not in redact_text(text)
