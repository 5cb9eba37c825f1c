"""The demo job README walks through: examples/tiny-job.json on `make run`'s `demo` data set, real MiniLM weights."""

import json
import time

import httpx
import pytest

from tests.integration.test_embedded_run import REPO_ROOT, _free_port, _start, _stop, _wait_ready

pytestmark = pytest.mark.integration

JOB_TIMEOUT_S = 600  # about a minute on an idle 2-core CPU; generous for a busy CI machine


def test_the_demo_job_ranks_readmes_example_the_right_way_round(tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process, key = _start(tmp_path / "home", port)
    headers = {"Authorization": f"Bearer {key}"}
    try:
        _wait_ready(port)
        spec = json.loads((REPO_ROOT / "examples" / "tiny-job.json").read_text())
        job = httpx.post(f"{url}/v1/jobs", headers=headers, json=spec, timeout=30).json()
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while job["status"] not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
            time.sleep(2)
            job = httpx.get(f"{url}/v1/jobs/{job['id']}", headers=headers, timeout=30).json()
        assert job["status"] == "succeeded", job

        metrics = httpx.get(f"{url}/v1/jobs/{job['id']}/metrics", headers=headers, timeout=30).json()
        rows = {row["model"]: row for row in metrics["final"]["sets"][0]["rows"]}
        assert {"floor:all-MiniLM-L6-v2", "teacher:minilm-tuned", "kd", "tmkd"} <= set(rows)

        answer = httpx.post(
            f"{url}/v1/models/tiny-demo/answer",
            headers=headers,
            json={"question": "what do bees make?", "passages": ["the sky is blue.", "bees make honey."]},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        ranked = [item["passage"] for item in answer.json()["answers"]]
        assert ranked == ["bees make honey.", "the sky is blue."]
    finally:
        _stop(process)
