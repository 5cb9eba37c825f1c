"""Shared test set-up: small, deterministic, CPU-only."""

import os
from pathlib import Path

import pytest
import torch

from tests.sample_data import write_sample_data

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

@pytest.fixture(scope="session")
def sample_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Q&A files made from the project's demo data, laid out like the benchmarks' data folder."""
    return write_sample_data(tmp_path_factory.mktemp("sample-data"))
