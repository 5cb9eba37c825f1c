"""CLI tests: the `qadistill` commands, in process, against a running embedded service with a real worker."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service import Service, embedded_service
from tests.unit.helpers import make_tiny_base


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight BERT folder: ready-made teachers and the student's source, fast on CPU."""
    return make_tiny_base(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """`qadistill run` on a free port, its state in a temp folder."""
    with embedded_service(tmp_path_factory.mktemp("cli") / "home") as running:
        yield running
