"""Paging the lists (has_more, a cursor that is not this list's is a 400) and deleting an alias."""

import pytest

from app.db.session import session_scope
from app.services.registry import register_version

LISTS = ("/v1/jobs", "/v1/datasets", "/v1/models")


def register(settings, tenant_id: str, name: str, count: int) -> None:
    with session_scope(settings.database_url) as session:
        for _ in range(count):
            register_version(
                session, tenant_id=tenant_id, name=name, job_id=None, artifact_uri=f"/models/{name}", metrics={}
            )


def test_lists_say_has_more_until_the_last_page(client, alice, settings, datasets):
    register(settings, alice.tenant_id, "faq", 5)
    pages, cursor = [], None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = client.get("/v1/models", headers=alice.headers, params=params).json()
        pages.append(([v["version"] for v in page["data"]], page["has_more"]))
        cursor = page["next_cursor"]
        if not page["has_more"]:
            assert cursor is None
            break
    assert pages == [([5, 4], True), ([3, 2], True), ([1], False)]

    first = client.get("/v1/datasets", headers=alice.headers, params={"limit": 2}).json()
    rest = client.get("/v1/datasets", headers=alice.headers, params={"cursor": first["next_cursor"]}).json()
    assert (len(first["data"]), first["has_more"], len(rest["data"]), rest["has_more"]) == (2, True, 1, False)
    jobs = client.get("/v1/jobs", headers=alice.headers).json()
    assert (jobs["data"], jobs["has_more"], jobs["next_cursor"]) == ([], False, None)


def test_a_cursor_of_another_list_is_400_on_every_list(client, alice, settings, datasets):
    register(settings, alice.tenant_id, "faq", 2)
    models_cursor = client.get("/v1/models", headers=alice.headers, params={"limit": 1}).json()["next_cursor"]
    datasets_cursor = client.get("/v1/datasets", headers=alice.headers, params={"limit": 1}).json()["next_cursor"]
    dataset_id = datasets["train"]["id"]
    for url, foreign in (("/v1/jobs", models_cursor), ("/v1/datasets", models_cursor), ("/v1/models", datasets_cursor)):
        for cursor in (foreign, dataset_id, ""):
            response = client.get(url, headers=alice.headers, params={"cursor": cursor})
            assert response.status_code == 400, (url, cursor, response.text)
            error = response.json()["error"]
            assert (error["code"], error["param"]) == ("invalid_cursor", "cursor")
            assert "next_cursor" in error["message"]


@pytest.mark.parametrize("param", ["after", "starting_after", "page", "offset"])
def test_another_apis_paging_parameter_is_400_naming_it(client, alice, param):
    for url in LISTS:
        response = client.get(url, headers=alice.headers, params={param: "2"})
        assert response.status_code == 400, (url, response.text)
        error = response.json()["error"]
        assert error["param"] == param and "cursor" in error["message"]
    filtered = client.get("/v1/models", headers=alice.headers, params={"name": "faq", "limit": 5})
    assert filtered.status_code == 200, "the list's own parameters still pass"


def test_delete_an_alias(client, alice, bob, settings):
    register(settings, alice.tenant_id, "faq", 2)
    promoted = client.put("/v1/models/faq/aliases/production", headers=alice.headers, json={"version": 1})
    assert promoted.status_code == 200
    assert client.get("/v1/models/faq", headers=alice.headers).json()["version"] == 1

    assert client.delete("/v1/models/faq/aliases/production", headers=bob.headers).status_code == 404
    deleted = client.delete("/v1/models/faq/aliases/production", headers=alice.headers)

    assert (deleted.status_code, deleted.content) == (204, b"")
    assert client.get("/v1/models/faq/aliases", headers=alice.headers).json() == []
    assert client.get("/v1/models/faq@production", headers=alice.headers).status_code == 404
    assert client.get("/v1/models/faq", headers=alice.headers).json()["version"] == 2, "no alias: the latest"
    again = client.delete("/v1/models/faq/aliases/production", headers=alice.headers)
    assert again.status_code == 404
    assert (again.json()["error"]["code"], again.json()["error"]["param"]) == ("alias_not_found", "alias")
    assert client.get("/v1/models/faq:1", headers=alice.headers).status_code == 200, "the version stays"
