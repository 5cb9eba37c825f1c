"""Real clients against a started `qadistill api`: Cohere's SDK, LlamaIndex's TEI reranker, qadistill's own.

The API runs in its own process (embedded mode: SQLite, local artifacts) with a tiny registered ensemble,
QADISTILL_RERANK_MODEL set for `/rerank`, and a long version-lookup TTL, so that an alias deleted through
the API must stop resolving at once (the process forgets its resolutions), not after the TTL.
"""

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cohere
import httpx
import pytest
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
from llama_index.postprocessor.tei_rerank import TextEmbeddingInference
from typer.testing import CliRunner

from app.cli import cli
from app.client import Client
from app.db.migrate import upgrade_database
from app.db.session import session_scope
from app.distill.data import Pair
from app.services.registry import register_version
from app.settings import Settings
from tests.service import REPO_ROOT, free_port
from tests.serving.test_api_answer import make_caller, register

READY_TIMEOUT_S = 120


@dataclass
class Api:
    url: str
    key: str
    settings: Settings
    tenant_id: str


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, tiny_ensemble: Path) -> Iterator[Api]:
    """`qadistill api` on a free port, its tenant's model `qa` version 1 the tiny ensemble."""
    home = tmp_path_factory.mktemp("rerank-home")
    settings = Settings(home=home)
    upgrade_database(settings.database_url)
    tenant_id, headers = make_caller(settings)
    register(settings, tenant_id, "qa", [tiny_ensemble])
    port = free_port()
    env = {
        **os.environ,
        "QADISTILL_HOME": str(home),
        "QADISTILL_RERANK_MODEL": "qa",
        "QADISTILL_SERVE_DEVICE": "cpu",
        "QADISTILL_SERVE_THREADS": "1",
        "QADISTILL_SERVE_LOOKUP_TTL_S": "3600",
        "OMP_NUM_THREADS": "1",
    }
    log = (home.parent / "rerank-api.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-c", "from app.cli import main; main()", "api", "--port", str(port)],
        cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert process.poll() is None, f"the API exited; log: {log.name}"
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"the API did not start; log: {log.name}"
            time.sleep(0.2)
        yield Api(url, headers["Authorization"].removeprefix("Bearer "), settings, tenant_id)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def question(eval_pairs: list[Pair]) -> tuple[str, list[str]]:
    """A real question and its candidate passages."""
    first = eval_pairs[0]
    return first.question, [p.passage for p in eval_pairs if p.qid == first.qid][:12]


def answer_order(api: Api, ref: str, question: str, passages: list[str]) -> list[int]:
    """The passages' indices, best first, as `/v1/models/{ref}/answer` ranks them."""
    response = httpx.post(
        f"{api.url}/v1/models/{ref}/answer",
        headers={"Authorization": f"Bearer {api.key}"},
        json={"question": question, "passages": passages},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return [a["index"] for a in response.json()["answers"]]


def test_cohere_sdk_reranks_as_the_answer_route(api: Api, question: tuple[str, list[str]]) -> None:
    text, passages = question
    expected = answer_order(api, "qa", text, passages)
    co = cohere.ClientV2(base_url=api.url, api_key=api.key)

    ranked = co.rerank(model="qa", query=text, documents=passages, top_n=3)
    everything = co.rerank(model="qa:1", query=text, documents=passages)

    assert [r.index for r in ranked.results] == expected[:3]
    assert [r.index for r in everything.results] == expected
    scores = [r.relevance_score for r in everything.results]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert ranked.meta is not None and ranked.meta.api_version is not None
    assert ranked.meta.api_version.version == "2"


def test_cohere_v1_client_takes_text_objects_and_the_default_model(api: Api, question: tuple[str, list[str]]) -> None:
    text, passages = question
    expected = answer_order(api, "qa", text, passages)
    co = cohere.Client(base_url=api.url, api_key=api.key)

    ranked = co.rerank(query=text, documents=[{"text": p} for p in passages], top_n=2, return_documents=True)

    assert [r.index for r in ranked.results] == expected[:2]
    assert [r.document.text for r in ranked.results if r.document] == [passages[i] for i in expected[:2]]


def test_cohere_sdk_raises_its_own_errors_with_our_message(api: Api) -> None:
    co = cohere.ClientV2(base_url=api.url, api_key=api.key)
    with pytest.raises(cohere.errors.NotFoundError) as missing:
        co.rerank(model="nope", query="q", documents=["a"])
    assert missing.value.body == {"message": "no model version 'nope'"}
    with pytest.raises(cohere.errors.BadRequestError) as empty:
        co.rerank(model="qa", query="q", documents=[])
    assert empty.value.body["message"].startswith("documents:")
    with pytest.raises(cohere.errors.UnauthorizedError):
        cohere.ClientV2(base_url=api.url, api_key="not-a-key").rerank(model="qa", query="q", documents=["a"])


def test_llamaindex_tei_reranker_reranks_as_the_answer_route(api: Api, question: tuple[str, list[str]]) -> None:
    text, passages = question
    expected = answer_order(api, "qa", text, passages)
    reranker = TextEmbeddingInference(base_url=api.url, top_n=4, auth_token=f"Bearer {api.key}")
    nodes = [NodeWithScore(node=TextNode(text=p, id_=str(i)), score=0.0) for i, p in enumerate(passages)]

    ranked = reranker.postprocess_nodes(nodes, QueryBundle(text))

    assert [int(n.node.node_id) for n in ranked] == expected[:4]
    assert all(0 <= (n.score or 0) <= 1 for n in ranked)


def test_deleting_an_alias_stops_it_resolving_at_once(api: Api, question: tuple[str, list[str]]) -> None:
    text, passages = question
    co = cohere.ClientV2(base_url=api.url, api_key=api.key)
    with Client(api.url, api.key) as client:
        client.set_alias("qa", 1, alias="staging")
        assert co.rerank(model="qa@staging", query=text, documents=passages).results  # resolved and remembered

        env = {"QADISTILL_URL": api.url, "QADISTILL_API_KEY": api.key}
        result = CliRunner().invoke(cli, ["unalias", "qa", "staging"], env=env)

        assert result.exit_code == 0, result.output
        assert result.stdout.strip() == "qa@staging deleted"
        with pytest.raises(cohere.errors.NotFoundError):
            co.rerank(model="qa@staging", query=text, documents=passages)
        assert client.list_aliases("qa") == []
        again = CliRunner().invoke(cli, ["unalias", "qa", "staging"], env=env)
        assert again.exit_code == 1 and "alias_not_found" in again.stderr


def test_client_pages_say_has_more(api: Api, tiny_ensemble: Path) -> None:
    with session_scope(api.settings.database_url) as session:
        for _ in range(3):  # one commit each: three distinct creation times, the list's order
            register_version(
                session, tenant_id=api.tenant_id, name="paged", job_id=None, artifact_uri=str(tiny_ensemble), metrics={}
            )
    with Client(api.url, api.key) as client:
        first = client.list_models(name="paged", limit=2)
        last = client.list_models(name="paged", limit=2, cursor=first.next_cursor)
    assert ([v.version for v in first.data], first.has_more) == ([3, 2], True)
    assert ([v.version for v in last.data], last.has_more, last.next_cursor) == ([1], False, None)
