"""The model registry over REST: versions, resolution by name, alias and number, promote and roll back."""

from app.db.session import session_scope
from app.services.registry import register_version


def _register(settings, tenant_id, name, job_id=None, metrics=None):
    with session_scope(settings.database_url) as session:
        version = register_version(
            session,
            tenant_id=tenant_id,
            name=name,
            job_id=job_id,
            artifact_uri=f"/models/{name}",
            metrics=metrics or {"primary": "tmkd"},
        )
        return version.version


def test_versions_count_up_per_name_and_list_newest_first(client, alice, settings):
    assert [_register(settings, alice.tenant_id, "faq") for _ in range(3)] == [1, 2, 3]
    assert _register(settings, alice.tenant_id, "other") == 1
    listed = client.get("/v1/models", headers=alice.headers, params={"name": "faq"}).json()["data"]
    assert [v["version"] for v in listed] == [3, 2, 1]


def test_resolve_by_name_alias_and_number(client, alice, settings):
    for _ in range(2):
        _register(settings, alice.tenant_id, "faq")
    get = lambda ref: client.get(f"/v1/models/{ref}", headers=alice.headers)  # noqa: E731
    assert get("faq").json()["version"] == 2
    assert get("faq:1").json()["version"] == 1
    assert get("faq/versions/1").json()["version"] == 1
    promoted = client.put("/v1/models/faq/aliases/production", headers=alice.headers, json={"version": 1})
    assert promoted.status_code == 200 and promoted.json()["version"] == 1
    assert get("faq").json()["version"] == 1
    assert get("faq@production").json()["version"] == 1
    client.put("/v1/models/faq/aliases/production", headers=alice.headers, json={"version": 2})
    assert get("faq").json()["version"] == 2
    aliases = client.get("/v1/models/faq/aliases", headers=alice.headers).json()
    assert [(a["alias"], a["version"]) for a in aliases] == [("production", 2)]
    for missing in ("faq:9", "faq@staging", "nothing"):
        response = get(missing)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "model_not_found"


def test_bad_alias_requests(client, alice, settings):
    _register(settings, alice.tenant_id, "faq")
    unknown_version = client.put("/v1/models/faq/aliases/production", headers=alice.headers, json={"version": 5})
    assert unknown_version.status_code == 404
    bad_name = client.put("/v1/models/faq/aliases/Prod!", headers=alice.headers, json={"version": 1})
    assert (bad_name.status_code, bad_name.json()["error"]["param"]) == (422, "alias")
    bad_body = client.put("/v1/models/faq/aliases/production", headers=alice.headers, json={"version": 0})
    assert (bad_body.status_code, bad_body.json()["error"]["param"]) == (422, "version")


def test_other_tenant_cannot_see_or_move_models(client, alice, bob, settings):
    _register(settings, alice.tenant_id, "faq")
    assert client.get("/v1/models/faq", headers=bob.headers).status_code == 404
    assert client.get("/v1/models", headers=bob.headers).json()["data"] == []
    moved = client.put("/v1/models/faq/aliases/production", headers=bob.headers, json={"version": 1})
    assert moved.status_code == 404
