"""`qadistill keys create --tenant NAME` prints a key that authenticates; `keys revoke` ends it."""

import pytest
from typer.testing import CliRunner

from app.cli import cli
from app.settings import get_settings


@pytest.fixture
def cli_settings(settings, monkeypatch):
    """The CLI reads its settings from the environment: point it at the test database."""
    monkeypatch.setenv("QADISTILL_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("QADISTILL_HOME", str(settings.home))
    get_settings.cache_clear()
    yield settings
    get_settings.cache_clear()


def test_keys_create_prints_a_working_key_and_revoke_ends_it(client, cli_settings):
    result = CliRunner().invoke(cli, ["keys", "create", "--tenant", "acme-cli"])
    assert result.exit_code == 0, result.output
    key = result.output.strip().splitlines()[-1]
    assert key.startswith("qd_") and len(key) > 40
    response = client.get("/v1/datasets", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200 and response.json()["data"] == []
    revoked = CliRunner().invoke(cli, ["keys", "revoke", key[:10]])
    assert revoked.exit_code == 0, revoked.output
    assert client.get("/v1/datasets", headers={"Authorization": f"Bearer {key}"}).status_code == 401
