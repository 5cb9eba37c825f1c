"""The Dockerfile as BuildKit's own parser reads it (the `dockerfile` package wraps it; no engine runs here):
its two targets run as a non-root user with a health check, install the chosen torch build before the
project's dependencies, keep the teacher weight packages out of the api image and bake no secret in; the
.dockerignore keeps environments, caches, state and secrets out of the build context."""

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import dockerfile
import pytest

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Stage:
    """One FROM ... AS name and its instructions."""

    name: str
    parent: str
    commands: list[dockerfile.Command] = field(default_factory=list)

    def values(self, cmd: str) -> list[tuple[str, ...]]:
        return [c.value for c in self.commands if c.cmd == cmd]


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    parsed: dict[str, Stage] = {}
    current: Stage | None = None
    for command in dockerfile.parse_file(str(REPO / "Dockerfile")):
        if command.cmd == "FROM":
            image, _, name = command.value
            current = parsed[name] = Stage(name, image)
        elif current is not None:
            current.commands.append(command)
    return parsed


def lineage(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, nearest first."""
    chain = [stages[name]]
    while chain[-1].parent in stages:
        chain.append(stages[chain[-1].parent])
    return chain


def runs(stages: dict[str, Stage], name: str) -> str:
    """Every RUN of the stage and its parents, in build order, as one shell text."""
    return "\n".join(" ".join(v) for stage in reversed(lineage(stages, name)) for v in stage.values("RUN"))


def test_targets_run_as_a_non_root_user_with_a_health_check(stages):
    for target, check in (("api", "/readyz"), ("worker", "worker-health")):
        stage = stages[target]
        assert stage.values("USER")[-1] == ("qadistill",), target
        (healthcheck,) = stage.values("HEALTHCHECK")
        assert healthcheck[0] == "CMD" and check in " ".join(healthcheck), healthcheck
        assert [c.cmd for c in stage.commands].index("USER") < [c.cmd for c in stage.commands].index("CMD")
    assert stages["api"].values("CMD") == [("qadistill", "api")]
    assert stages["worker"].values("CMD") == [("qadistill", "worker")]
    assert "useradd --uid 10001" in runs(stages, "base")


def test_torch_is_the_chosen_build_installed_before_the_dependencies(stages):
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = next(d for d in dependencies if d.startswith("torch"))
    for deps, extras in (("api-deps", ".[s3]"), ("worker-deps", ".[s3,models]")):
        args = dict(v[0].split("=", 1) for v in stages[deps].values("ARG"))
        assert f"torch=={args['TORCH_VERSION']}" == pinned, (deps, pinned)
        text = runs(stages, deps)
        torch_at = text.index('"torch==${TORCH_VERSION}"')
        assert text.index("download.pytorch.org/whl/") < torch_at < text.index(f'pip install "{extras}"'), deps
    # The api is CPU only; the worker is CUDA unless built with TORCH_VARIANT=cpu, and refuses anything else.
    assert "https://download.pytorch.org/whl/cpu " in runs(stages, "api-deps")
    worker_args = dict(v[0].split("=", 1) for v in stages["worker-deps"].values("ARG"))
    assert worker_args["TORCH_VARIANT"] == "cuda" and re.fullmatch(r"cu\d{3}", worker_args["TORCH_CUDA"])
    case = runs(stages, "worker-deps")
    assert 'cuda) index="${TORCH_CUDA}"' in case and "cpu) index=cpu" in case and "exit 1" in case
    # The teacher weight packages (the `models` extra) are the worker's alone.
    assert "models" not in runs(stages, "api")
    assert stages["api"].values("COPY")[0] == ("/opt/venv", "/opt/venv")
    api_from = [c.flags for c in stages["api"].commands if c.cmd == "COPY"][0]
    worker_from = [c.flags for c in stages["worker"].commands if c.cmd == "COPY"][0]
    assert (api_from, worker_from) == (("--from=api-deps",), ("--from=worker-deps",))


def test_no_secret_is_baked_in(stages):
    for stage in stages.values():
        for command in stage.commands:
            if command.cmd in ("ENV", "ARG"):
                names = command.value[::2] if command.cmd == "ENV" else [v.split("=")[0] for v in command.value]
                secret = [n for n in names if re.search(r"PASSWORD|SECRET|TOKEN|_KEY|ACCESS", n, re.IGNORECASE)]
                assert not secret, (stage.name, command.original)
    assert "AWS_" not in (REPO / "Dockerfile").read_text()


def test_dockerignore_sends_the_code_and_nothing_else():
    rules = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    # Everything is left out, then the code is let back in: .venv, .git, caches, state, data and .env stay out.
    assert rules[0] == "*"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "alembic.ini", "app", "workers", "migrations"}
    assert {"**/.env", "**/__pycache__", "**/*.db"} <= set(rules)
    # What the images COPY is what the context lets in, and covers the packages pyproject.toml installs.
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert {p.rstrip("*") for p in packages["include"]} <= allowed
