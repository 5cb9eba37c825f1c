"""Steps of a user's flow shared by the integration tests: upload, a tiny spec, follow events."""

import json
from pathlib import Path
from typing import Any


def upload(stack: Any, caller: Any, content: bytes, name: str) -> str:
    """Upload `content` as dataset `name` for `caller`; its id."""
    response = stack.client.post(
        "/v1/datasets",
        headers=caller.headers,
        files={"file": (f"{name}.jsonl", content)},
        data={"name": name},
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def unlabelled_slice(sample_data: Path, pairs: int = 32) -> bytes:
    """The first `pairs` unlabelled pairs of the shared data, as a JSONL upload."""
    lines = (sample_data / "unlabeled" / "xquad-en-pairs.jsonl").read_text().splitlines()[:pairs]
    return ("\n".join(lines) + "\n").encode()


def tiny_spec(tiny_base: Path, **overrides: Any) -> dict[str, Any]:
    """A job body that runs in seconds: two ready-made tiny teachers, a one-layer student, a few steps."""
    teacher = {"path": str(tiny_base), "max_length": 32}
    spec = {
        "name": "faq",
        "variants": ["kd", "tmkd"],
        "data": {"train": "demo", "eval": "demo", "unlabeled": "pool"},
        "teachers": [teacher | {"name": "t1"}, teacher | {"name": "t2"}],
        "student": {"init_from": str(tiny_base), "layers": [0], "max_length": 32},
        "stage1": {"batch_size": 16, "max_steps": 3, "learning_rate": 1e-3},
        "stage2": {"batch_size": 16, "max_steps": 4, "learning_rate": 1e-3},
        "checkpoint_every": 2,
        "device": "cpu",
    }
    spec.update(overrides)
    return spec


def follow_events(stack: Any, caller: Any, job_id: str) -> list[tuple[str | None, dict[str, Any]]]:
    """The (event, data) messages of following a job's events to its end."""
    url = f"/v1/jobs/{job_id}/events"
    with stack.client.stream("GET", url, headers=caller.headers, params={"follow": "true"}) as stream:
        text = "".join(stream.iter_text())
    messages: list[tuple[str | None, dict[str, Any]]] = []
    event = None
    for line in text.splitlines():
        if line.startswith("event:"):
            event = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            messages.append((event, json.loads(line.removeprefix("data:"))))
    return messages
