"""Every client command of `qadistill` against a running embedded service: tables for people, --json for scripts,
and errors as one readable line with a non-zero exit status."""

import json
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from app.cli import cli
from app.client import Client
from tests.service import Service

pytestmark = pytest.mark.integration

GOOD_ROWS = [
    {"qid": f"q{q}", "question": f"question {q}?", "passage": f"passage {q}-{p}", "label": int(p == 0)}
    for q in range(6)
    for p in range(3)
]


def qd(service: Service, *args: str, key: str | None = None) -> Any:
    """Run `qadistill ARGS` with the service's URL and key in the environment, as a user's shell has them."""
    env = {"QADISTILL_URL": service.url, "QADISTILL_API_KEY": key or service.key}
    return CliRunner().invoke(cli, list(args), env=env)


def ok_json(result: Any) -> Any:
    """The parsed stdout of a command that must have succeeded."""
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}"
    return json.loads(result.stdout)


def tiny_spec(tiny_base: Path, name: str, **overrides: Any) -> dict[str, Any]:
    """A job that runs in seconds: one ready-made tiny teacher and a one-layer student."""
    spec = {
        "name": name,
        "variants": ["kd"],
        "data": {"train": "demo", "eval": "demo"},
        "teachers": [{"name": "t1", "path": str(tiny_base), "max_length": 32}],
        "student": {"init_from": str(tiny_base), "layers": [0], "max_length": 32},
        "stage2": {"max_steps": 3, "batch_size": 16},
        "device": "cpu",
    }
    return spec | overrides


def write_spec(tmp_path: Path, spec: dict[str, Any]) -> str:
    path = tmp_path / f"{spec['name']}.json"
    path.write_text(json.dumps(spec))
    return str(path)


def test_datasets_upload_list_delete(service, tmp_path):
    good = tmp_path / "faq.jsonl"
    good.write_text("".join(json.dumps(row) + "\n" for row in GOOD_ROWS))
    uploaded = ok_json(qd(service, "datasets", "upload", str(good), "--name", "faq", "--json"))
    assert (uploaded["name"], uploaded["pairs"], uploaded["questions"], uploaded["positives"]) == ("faq", 18, 6, 6)

    listed = ok_json(qd(service, "datasets", "list", "--json"))
    assert {d["name"] for d in listed} == {"demo", "faq"}
    table = qd(service, "datasets", "list")
    assert table.exit_code == 0 and table.stdout.splitlines()[0].split()[:3] == ["ID", "NAME", "FORMAT"]
    assert "faq" in table.stdout and "18" in table.stdout

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(GOOD_ROWS[0]) + "\n" + json.dumps({"question": "q?", "passage": "p", "label": 7}) + "\n")
    refused = qd(service, "datasets", "upload", str(bad))
    assert refused.exit_code == 1
    assert refused.stderr.startswith("error: 422 invalid_file: bad.jsonl: line 2, field 'label'"), refused.stderr

    deleted = ok_json(qd(service, "datasets", "delete", "faq", "--json"))
    assert deleted == {"deleted": "faq"}
    again = qd(service, "datasets", "delete", "faq", "--json")
    assert again.exit_code == 1
    assert json.loads(again.stderr)["error"]["code"] == "dataset_not_found"


def test_submit_follow_status_logs_models_promote_ask(service, tmp_path, tiny_base):
    spec = write_spec(tmp_path, tiny_spec(tiny_base, "cli-demo"))
    followed = qd(service, "submit", spec, "--follow")
    assert followed.exit_code == 0, followed.output
    first_line, *_, last_line = followed.stdout.strip().splitlines()
    job_id = first_line.split()[0]
    assert job_id.startswith("job_") and first_line.endswith("cli-demo: queued")
    assert last_line == f"job {job_id}: succeeded; model cli-demo:1"
    assert "[finish] succeeded" in followed.stdout  # the events, streamed
    assert "%|" in followed.stderr  # the stage bars

    second = ok_json(qd(service, "submit", spec, "--json", "--idempotency-key", "second"))
    assert second["status"] == "queued" and second["name"] == "cli-demo"
    events = [json.loads(line) for line in qd(service, "logs", second["id"], "--follow", "--json").stdout.splitlines()]
    assert events and events[-1]["message"].startswith("succeeded")
    assert [e["id"] for e in events] == sorted({e["id"] for e in events})  # each once, in order

    jobs = ok_json(qd(service, "jobs", "--json"))
    assert [j["id"] for j in jobs][:2] == [second["id"], job_id]
    assert ok_json(qd(service, "jobs", "--status", "succeeded", "--json", "--limit", "1"))[0]["id"] == second["id"]
    assert job_id in qd(service, "jobs").stdout

    summary = qd(service, "status", job_id)
    assert summary.exit_code == 0
    assert f"job       {job_id}  cli-demo" in summary.stdout and "status    succeeded" in summary.stdout
    assert "model     cli-demo:1" in summary.stdout and "MAP       " in summary.stdout
    assert "queue     cpu" in summary.stdout  # device: cpu
    assert "teachers" not in summary.stdout  # no spec dump
    status = ok_json(qd(service, "status", job_id, "--json"))
    assert status["model"] == {"name": "cli-demo", "version": 1} and status["report"]["sets"]

    finished = qd(service, "cancel", job_id)
    assert finished.exit_code == 1, finished.output
    assert finished.stderr.strip() == f"error: 409 job_finished: job {job_id} already succeeded (field: job_id)"

    logs = qd(service, "logs", job_id)
    assert logs.exit_code == 0 and "[finish] succeeded" in logs.stdout

    versions = ok_json(qd(service, "models", "--json"))
    assert [(v["name"], v["version"], v["aliases"]) for v in versions] == [("cli-demo", 2, []), ("cli-demo", 1, [])]
    promoted = ok_json(qd(service, "promote", "cli-demo", "1", "--alias", "production", "--json"))
    assert (promoted["alias"], promoted["version"]) == ("production", 1)
    assert "cli-demo@production -> version 2" in qd(service, "promote", "cli-demo", "2", "-a", "production").stdout
    table = qd(service, "models")
    assert table.stdout.splitlines()[1].split()[:3] == ["cli-demo", "2", "production"]

    passages = ["bees make honey.", "the sky is blue.", "paris is in france."]
    args = ["ask", "cli-demo@production", "-q", "what do bees make?"] + [a for p in passages for a in ("-p", p)]
    answer = ok_json(qd(service, *args, "--json"))
    assert answer["model"] == {"name": "cli-demo", "version": 2}
    assert sorted(a["index"] for a in answer["answers"]) == [0, 1, 2]
    scores = [a["score"] for a in answer["answers"]]
    assert scores == sorted(scores, reverse=True)
    people = qd(service, *args, "--top-k", "1")
    assert people.exit_code == 0 and people.stdout.splitlines()[1].split() == ["#", "SCORE", "PASSAGE"]
    assert len(people.stdout.strip().splitlines()) == 3


def test_cancel_stops_a_running_job(service, tmp_path, tiny_base):
    # A teacher that trains (from the tiny base) for far longer than the test waits.
    slow_teacher = {"name": "slow", "base": str(tiny_base), "max_length": 32, "batch_size": 4, "epochs": 50}
    spec = write_spec(tmp_path, tiny_spec(tiny_base, "cli-long", teachers=[slow_teacher]))
    job = ok_json(qd(service, "submit", spec, "--json"))
    with Client(service.url, service.key) as client:
        deadline = time.monotonic() + 120
        while not (client.get_job(job["id"]).stage or "").startswith("teacher:"):  # training has started
            assert time.monotonic() < deadline, client.get_job(job["id"])
            time.sleep(0.2)
        cancelled = ok_json(qd(service, "cancel", job["id"], "--json"))
        assert cancelled["status"] in ("cancelling", "cancelled") and cancelled["cancel_requested"]
        assert client.wait_for_job(job["id"], timeout=120).status == "cancelled"
    again = qd(service, "cancel", job["id"])  # idempotent
    assert again.exit_code == 0 and again.stdout.strip() == f"{job['id']}  cli-long: cancelled"


def test_errors_are_one_readable_line_and_a_non_zero_exit(service, tmp_path, tiny_base):
    missing = qd(service, "status", "job_doesnotexist")
    assert missing.exit_code == 1 and missing.stderr.startswith("error: 404 job_not_found: "), missing.stderr
    assert missing.stdout == ""

    wrong_key = qd(service, "jobs", key="qd_not-a-key-at-all-xxxxxxxxxxxxxxxxxxxxxxxxx")
    assert wrong_key.exit_code == 1 and wrong_key.stderr.startswith("error: 401 unauthorized: "), wrong_key.stderr

    invalid = write_spec(tmp_path, tiny_spec(tiny_base, "cli-bad", stage2={"max_steps": -1}))
    refused = qd(service, "submit", invalid, "--json")
    assert refused.exit_code == 1
    assert json.loads(refused.stderr)["error"] | {"message": ""} == {
        "status": 422, "code": "invalid_request", "message": "", "param": "stage2.max_steps"
    }  # fmt: skip
    human = qd(service, "submit", invalid)
    assert "(field: stage2.max_steps)" in human.stderr

    nowhere = {"QADISTILL_URL": "http://127.0.0.1:9", "QADISTILL_API_KEY": "k"}
    unreachable = CliRunner().invoke(cli, ["jobs"], env=nowhere)
    assert unreachable.exit_code == 3 and "is the service running?" in unreachable.stderr

    no_spec = qd(service, "submit", str(tmp_path / "absent.json"))
    assert no_spec.exit_code == 2 and "cannot read the spec" in no_spec.stderr
