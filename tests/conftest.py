import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "aropd" / "assets" / "tiny-llama")
TOY = ROOT / "aropd" / "assets" / "toy"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: one intra-op thread is fastest and does not stall when the cores are shared.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_path() -> str:
    return TINY


@pytest.fixture(scope="session")
def tokenizer():
    from aropd.models import load_tokenizer

    return load_tokenizer(TINY)
