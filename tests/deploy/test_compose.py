"""docker-compose.yml as compose itself reads it: `docker compose config` (the plugin) or Debian's `docker-compose`
renders it with a .env of sentinel secrets, and the rendered services are checked: queues, health checks,
dependencies, restart policies, memory limits, the GPU reservation, pinned images, no shared folder, and no
secret outside the containers' environment. No engine is needed (nothing is started)."""

import os
import re
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
SERVICES = {"postgres", "redis", "minio", "minio-init", "api", "worker", "worker-gpu"}
QADISTILL = ("api", "worker", "worker-gpu")
ONE_SHOT = "minio-init"
SECRET_VARS = ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "MINIO_ROOT_PASSWORD", "S3_SECRET_ACCESS_KEY")
UNITS = {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def compose_command() -> list[str]:
    """The docker compose plugin when the docker CLI has it, else Debian's docker-compose (.ci/run installs it)."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    assert legacy, "neither `docker compose` nor `docker-compose` is installed (apt-get install docker-compose)"
    return [legacy]


def render(env_file: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`config` of the compose file with only `env_file` as its .env (none of this process's variables)."""
    command = [*compose_command(), "--env-file", str(env_file), "-f", str(COMPOSE_FILE), "--profile", "gpu", "config"]
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)


def env_with_sentinels(path: Path) -> dict[str, str]:
    """.env.example with every secret replaced by a unique sentinel, written to `path`; the sentinels by name."""
    sentinels = {name: f"sentinel{name.lower().replace('_', '')}{secrets.token_hex(6)}" for name in SECRET_VARS}
    lines = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        name = line.partition("=")[0]
        lines.append(f"{name}={sentinels[name]}" if name in sentinels else line)
    path.write_text("\n".join(lines) + "\n")
    return sentinels


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, str]]:
    tmp_path = tmp_path_factory.mktemp("compose")
    sentinels = env_with_sentinels(tmp_path / "test.env")
    result = render(tmp_path / "test.env", tmp_path)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout), sentinels


def memory_bytes(value: str | int) -> int:
    """'4g', '512m' or a byte count (the plugin renders bytes) in bytes."""
    match = re.fullmatch(r"(\d+)([bkmg]?)b?", str(value).lower())
    assert match, value
    return int(match[1]) * UNITS[match[2] or "b"]


def test_services_and_their_queues(rendered):
    config, _ = rendered
    services = config["services"]
    assert set(services) == SERVICES
    assert services["worker"]["command"] == ["qadistill", "worker", "-Q", "cpu"]
    assert services["worker"]["build"]["args"]["TORCH_VARIANT"] == "cpu"
    gpu = services["worker-gpu"]
    assert gpu["command"] == ["qadistill", "worker", "-Q", "gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["args"]["TORCH_VARIANT"] == "cuda"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert (device["driver"], int(device["count"]), device["capabilities"]) == ("nvidia", 1, ["gpu"])
    assert services["api"]["build"]["target"] == "api"
    assert {services[s]["build"]["target"] for s in ("worker", "worker-gpu")} == {"worker"}
    assert all("profiles" not in services[s] for s in SERVICES - {"worker-gpu"})


def test_health_checks_dependencies_and_restart_policies(rendered):
    config, _ = rendered
    services = config["services"]
    for name in SERVICES - {ONE_SHOT}:
        check = services[name].get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), name
        assert services[name]["restart"] in ("always", "unless-stopped"), name
    for name in ("worker", "worker-gpu"):
        assert services[name]["healthcheck"]["test"] == ["CMD", "qadistill", "worker-health"]
    assert "/readyz" in " ".join(services["api"]["healthcheck"]["test"])
    # The one-shot job retries a failure and the services that need the bucket wait for it to succeed.
    assert services[ONE_SHOT]["restart"].startswith("on-failure")
    assert services[ONE_SHOT]["depends_on"]["minio"]["condition"] == "service_healthy"
    for name in QADISTILL:
        depends = {dep: spec["condition"] for dep, spec in services[name]["depends_on"].items()}
        assert depends == {
            "postgres": "service_healthy",
            "redis": "service_healthy",
            ONE_SHOT: "service_completed_successfully",
        }, name


def test_memory_limits_pinned_images_and_no_shared_folder(rendered):
    config, _ = rendered
    services = config["services"]
    for name, service in services.items():
        assert memory_bytes(service["deploy"]["resources"]["limits"]["memory"]) >= 128 * 1024**2, name
        if "build" not in service:
            image = service["image"]
            tag = image.rpartition(":")[2]
            assert re.fullmatch(r"\d+(\.\d+)+(-\w+)?|RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", tag), image
    # Artifacts go to the bucket: no qadistill process mounts a folder, and each volume has one owner.
    for name in QADISTILL:
        assert not services[name].get("volumes"), name
    owners: dict[str, list[str]] = {}
    for name, service in services.items():
        for mount in service.get("volumes", []):
            source = mount["source"] if isinstance(mount, dict) else mount.split(":")[0]
            owners.setdefault(source, []).append(name)
    assert owners == {"postgres-data": ["postgres"], "redis-data": ["redis"], "minio-data": ["minio"]}
    redis = services["redis"]
    assert "--appendonly yes" in " ".join(redis["command"])


def test_no_secret_is_written_in_the_compose_file(rendered, tmp_path):
    config, sentinels = rendered
    text = COMPOSE_FILE.read_text()
    raw = yaml.safe_load(text)
    # Each secret is a required interpolation from .env, never a literal.
    for name in SECRET_VARS:
        assert f"${{{name}:?" in text, name
    for service, spec in raw["services"].items():
        for key, value in (spec.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|AUTH|_KEY", key) and key != "QADISTILL_METRICS_KEY":
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]*\}", str(value)), (service, key, value)
    assert re.search(r"redis://:\$\{REDIS_PASSWORD:\?", text) and re.search(r":\$\{POSTGRES_PASSWORD:\?", text)
    # Rendered, the secrets reach the containers' environment and nothing else: no command line, health check,
    # image or label carries one (commands read them as $$VAR inside the container).
    for service, spec in config["services"].items():
        outside = yaml.safe_dump({k: v for k, v in spec.items() if k != "environment"})
        leaked = [name for name, value in sentinels.items() if value in outside]
        assert not leaked, (service, leaked)
    # A .env without a secret stops compose, naming it.
    env_file = tmp_path / "no-redis.env"
    env_file.write_text(
        "\n".join(line for line in ENV_EXAMPLE.read_text().splitlines() if not line.startswith("REDIS_PASSWORD="))
    )
    missing = render(env_file, tmp_path)
    assert missing.returncode != 0 and "REDIS_PASSWORD" in missing.stderr, missing.stderr


def test_env_example_names_every_variable_the_compose_file_reads():
    lines = [line for line in COMPOSE_FILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", "\n".join(lines)))
    example = {line.partition("=")[0] for line in ENV_EXAMPLE.read_text().splitlines() if re.match(r"[A-Z]", line)}
    assert used <= example, used - example
    # None of them has qadistill's own prefix: a `make run` in the same folder must not read them as its settings.
    assert not [name for name in example if name.startswith("QADISTILL_")]
