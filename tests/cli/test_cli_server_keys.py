"""`qadistill keys create|list|revoke` open the server's database, found as the server finds it, or refuse."""

import json

import httpx
import pytest
from typer.testing import CliRunner

from app.cli import cli
from app.settings import get_settings

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def fresh_settings():
    """The CLI reads its settings once per process: let each invocation read the environment it is given."""
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def keys(*args: str, **env: str | None):
    get_settings.cache_clear()
    return CliRunner().invoke(cli, ["keys", *args], env={"QADISTILL_DATABASE_URL": None, **env})


def test_keys_on_the_running_servers_home(service):
    home = str(service.home)
    created = keys("create", "--tenant", "acme", "--json", QADISTILL_HOME=home)
    assert created.exit_code == 0, created.output
    key = json.loads(created.stdout)
    assert key["tenant"] == "acme" and key["key"].startswith(key["prefix"])
    auth = {"Authorization": f"Bearer {key['key']}"}
    assert httpx.get(f"{service.url}/v1/datasets", headers=auth).status_code == 200

    listed = keys("list", "--json", QADISTILL_HOME=home)
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    assert {(r["tenant"], r["revoked_at"]) for r in rows} >= {("demo", None), ("acme", None)}
    assert all("key" not in r for r in rows)  # only the shown prefix: keys are stored as hashes
    table = keys("list", "--tenant", "acme", QADISTILL_HOME=home)
    assert table.stdout.splitlines()[1].split()[:2] == [key["prefix"], "acme"]

    revoked = keys("revoke", key["prefix"], QADISTILL_HOME=home)
    assert revoked.exit_code == 0 and revoked.stdout.strip() == "revoked 1 key(s)"
    assert httpx.get(f"{service.url}/v1/datasets", headers=auth).status_code == 401
    after = json.loads(keys("list", "--tenant", "acme", "--json", QADISTILL_HOME=home).stdout)
    assert after[0]["revoked_at"] is not None
    assert keys("revoke", key["prefix"], QADISTILL_HOME=home).exit_code == 1


def test_keys_from_another_folder_refuse_instead_of_making_a_new_database(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command in (["create", "--tenant", "acme"], ["list"], ["revoke", "qd_abcdefghij"]):
        result = keys(*command, QADISTILL_HOME=None)
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith(f"error: no qadistill database at {tmp_path / '.qadistill' / 'qadistill.db'}")
        assert "QADISTILL_HOME" in result.stderr and result.stdout == ""
    assert not (tmp_path / ".qadistill").exists()
