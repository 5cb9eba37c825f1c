"""A pair's score never depends on its batch-mates: alone, or batched with questions too long to fit.

The bug this guards against: a batch holding one question too long for `only_second` truncation was cut
`longest_first` as a whole, so a pair kept fewer passage tokens (and more question tokens) whenever such
a question shared its batch.
"""

import asyncio
from pathlib import Path

import numpy as np
from prometheus_client import REGISTRY

from app.distill.data import Pair
from app.distill.scoring import PairEncoder
from app.serving.backends import load_runner
from app.serving.runtime import ServedVersion, ServingRuntime
from app.settings import Settings

# ~40 tokens: only_second keeps it whole and cuts the passage; longest_first (max_length 64) would cut both.
QUESTION = "which of the " + " ".join(f"word{i}" for i in range(18)) + " stories was written first ?"
LONG_QUESTION = "what " + " ".join(f"clause{i}" for i in range(60)) + " ?"  # over max_length on its own


def _passage(pairs: list[Pair]) -> str:
    return " ".join(p.passage for p in pairs[:3])  # long enough to be cut


def test_a_pair_keeps_its_tokens_and_score_when_batched_with_long_questions(
    tiny_ensemble: Path, eval_pairs: list[Pair]
) -> None:
    runner = load_runner(tiny_ensemble)
    passage, other = _passage(eval_pairs), eval_pairs[5].passage
    encoder: PairEncoder = runner.encoder

    alone_tokens = encoder([QUESTION], [passage]).input_ids[0]
    batched_tokens = encoder([LONG_QUESTION, QUESTION, LONG_QUESTION], [other, passage, passage]).input_ids[1]
    assert batched_tokens == alone_tokens
    assert len(alone_tokens) == 64  # the passage was cut, the question kept whole
    question_tokens = len(encoder.tokenizer(QUESTION, add_special_tokens=False)["input_ids"])
    assert alone_tokens[question_tokens + 1] == encoder.tokenizer.sep_token_id

    alone = runner.score([QUESTION], [passage]).scores[0]
    batched = runner.score([LONG_QUESTION, QUESTION, LONG_QUESTION], [other, passage, passage]).scores[1]
    np.testing.assert_allclose(batched, alone, atol=1e-6)


def test_served_answer_is_the_same_alone_and_batched_with_long_questions(
    tiny_ensemble: Path, eval_pairs: list[Pair], tmp_path: Path
) -> None:
    passage = _passage(eval_pairs)
    # A long wait lets the concurrent questions meet in one batch.
    settings = Settings(home=tmp_path / "home", serve_device="cpu", serve_threads=1, serve_max_wait_ms=300)
    version = ServedVersion(id="mv_iso_1", name="iso", version=1, artifact_uri=str(tiny_ensemble))

    def batches() -> tuple[float, float]:
        return tuple(REGISTRY.get_sample_value(f"qadistill_batch_requests_{k}") or 0.0 for k in ("count", "sum"))

    async def scenario() -> tuple[float, float, tuple[float, float]]:
        runtime = ServingRuntime(settings)
        await runtime.start()
        try:
            alone = await runtime.answer(version, QUESTION, [passage])
            before = batches()
            _, together, _ = await asyncio.gather(
                runtime.answer(version, LONG_QUESTION, [passage, eval_pairs[5].passage]),
                runtime.answer(version, QUESTION, [passage]),
                runtime.answer(version, LONG_QUESTION, [passage]),
            )
            after = batches()
            return alone.passages[0].score, together.passages[0].score, (after[0] - before[0], after[1] - before[1])
        finally:
            await runtime.aclose()

    alone, together, merged = asyncio.run(scenario())
    assert merged == (1, 3)  # the three questions were answered in one batch...
    np.testing.assert_allclose(together, alone, atol=1e-6)  # ...and the pair scored as when alone
