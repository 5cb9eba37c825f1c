"""Uploading, listing, reading and deleting datasets over REST."""

import tempfile
from pathlib import Path


def _temp_uploads() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("qadistill-upload-*"))


def test_upload_counts_and_reads_back_by_id_and_name(client, alice, upload, pairs_jsonl):
    response = upload(alice, pairs_jsonl(4), name="small-train")
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["name"], body["format"], body["labelled"]) == ("small-train", "jsonl", True)
    assert (body["pairs"], body["questions"], body["positives"]) == (12, 4, 4)
    for ref in (body["id"], "small-train"):
        got = client.get(f"/v1/datasets/{ref}", headers=alice.headers)
        assert got.status_code == 200
        assert got.json()["id"] == body["id"]
    listed = client.get("/v1/datasets", headers=alice.headers).json()
    assert [d["id"] for d in listed["data"]] == [body["id"]]


def test_same_content_twice_is_one_dataset(client, alice, upload, pairs_jsonl):
    first = upload(alice, pairs_jsonl(3), name="once")
    again = upload(alice, pairs_jsonl(3), name="twice")
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    assert len(client.get("/v1/datasets", headers=alice.headers).json()["data"]) == 1


def test_csv_tsv_and_explicit_format(upload, alice):
    csv = b"question,passage,label\nwho?,someone did,1\nwho?,nobody,0\n"
    tsv = b"question\tpassage\nwhere?\there\nwhen?\tnow\n"
    assert upload(alice, csv, "a.csv").json()["format"] == "csv"
    unlabelled = upload(alice, tsv, "b.tsv").json()
    assert (unlabelled["format"], unlabelled["labelled"], unlabelled["pairs"]) == ("tsv", False, 2)
    explicit = upload(alice, csv.replace(b"someone", b"somebody"), "c.txt", format="csv")
    assert explicit.status_code == 201
    assert explicit.json()["name"] == "c"


def test_bad_row_names_line_and_field_and_stores_nothing(client, alice, upload, stored_files):
    before_files, before_temp = stored_files(), _temp_uploads()
    content = (
        b'{"question": "q1", "passage": "p1", "label": 1}\n'
        b'{"question": "q1", "passage": "p2", "label": 0}\n'
        b'{"question": "q2", "passage": "p3", "label": 7}\n'
    )
    response = upload(alice, content, "bad.jsonl")
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["param"] == "file"
    assert "line 3" in error["message"] and "label" in error["message"]
    assert client.get("/v1/datasets", headers=alice.headers).json()["data"] == []
    assert stored_files() == before_files
    assert _temp_uploads() == before_temp


def test_empty_file_and_missing_column_rejected(upload, alice):
    empty = upload(alice, b"", "empty.jsonl")
    assert empty.status_code == 422 and empty.json()["error"]["param"] == "file"
    no_passage = upload(alice, b"question,label\nwho?,1\n", "x.csv")
    assert no_passage.status_code == 422
    assert "passage" in no_passage.json()["error"]["message"]


def test_too_large_upload_is_413_and_stores_nothing(client, alice, upload, settings, stored_files):
    before = stored_files()
    row = b'{"question": "q", "passage": "' + b"x" * 1000 + b'", "label": 1}\n'
    response = upload(alice, row * (settings.max_upload_bytes // len(row) + 1), "big.jsonl")
    assert response.status_code == 413
    assert response.json()["error"]["param"] == "file"
    assert stored_files() == before
    assert client.get("/v1/datasets", headers=alice.headers).json()["data"] == []


def test_chunked_body_without_length_is_cut_off_while_streaming(client, alice, settings, stored_files):
    before = stored_files()
    boundary = "qadistill-test-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'.encode()
    )
    row = b'{"question": "q", "passage": "' + b"x" * 1000 + b'", "label": 1}\n'

    def body():  # a generator: sent chunked, with no Content-Length to refuse it by
        yield head
        for _ in range(3 * settings.max_request_bytes // len(row)):  # past the cap: twice the largest limit
            yield row
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = alice.headers | {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    response = client.post("/v1/datasets", headers=headers, content=body())
    assert response.status_code == 413
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("request_too_large", "body")
    assert stored_files() == before
    assert client.get("/v1/datasets", headers=alice.headers).json()["data"] == []


def test_unknown_format_bad_name_and_taken_name(upload, alice, pairs_jsonl):
    unknown = upload(alice, pairs_jsonl(2), "pairs.xlsx")
    assert (unknown.status_code, unknown.json()["error"]["param"]) == (422, "format")
    bad_name = upload(alice, pairs_jsonl(2), name="no spaces please")
    assert (bad_name.status_code, bad_name.json()["error"]["param"]) == (422, "name")
    assert upload(alice, pairs_jsonl(2), name="taken").status_code == 201
    clash = upload(alice, pairs_jsonl(3), name="taken")
    assert (clash.status_code, clash.json()["error"]["param"]) == (409, "name")


def test_missing_file_part(client, alice):
    response = client.post("/v1/datasets", headers=alice.headers, data={"name": "x"})
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "file"


def test_delete_removes_row_and_file(client, alice, upload, pairs_jsonl, stored_files):
    before = stored_files()
    dataset = upload(alice, pairs_jsonl(2)).json()
    assert len(stored_files()) == len(before) + 1
    assert client.delete(f"/v1/datasets/{dataset['id']}", headers=alice.headers).status_code == 204
    assert client.get(f"/v1/datasets/{dataset['id']}", headers=alice.headers).status_code == 404
    assert stored_files() == before


def test_other_tenant_sees_404_and_keeps_its_own_copy(client, alice, bob, upload, pairs_jsonl):
    mine = upload(alice, pairs_jsonl(2), name="shared-name").json()
    for method in ("get", "delete"):
        response = getattr(client, method)(f"/v1/datasets/{mine['id']}", headers=bob.headers)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "dataset_not_found"
    assert client.get("/v1/datasets", headers=bob.headers).json()["data"] == []
    theirs = upload(bob, pairs_jsonl(2), name="shared-name")
    assert theirs.status_code == 201 and theirs.json()["id"] != mine["id"]


def test_requests_without_a_valid_key_are_401(client):
    assert client.get("/v1/datasets").status_code == 401
    wrong = client.get("/v1/datasets", headers={"Authorization": "Bearer qd_not-a-real-key"})
    assert wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "unauthorized"
