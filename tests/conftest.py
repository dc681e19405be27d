"""Shared test fixtures: where the real data lives, and skipping cleanly where it does not."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VOCAB_FILE = ROOT / "data" / "ko_vocab_32k.txt"
CONFIG_FILE = ROOT / "data" / "bert_small.json"
DEV_CANDIDATES = (
    ROOT.parent / "shared" / "data" / "KorQuAD_v1.0_dev.json",
    ROOT / "data" / "KorQuAD_v1.0_dev.json",
)


def find_dev_file() -> Path | None:
    """The real KorQuAD v1.0 dev set, if this checkout has one beside it or in data/."""
    return next((p for p in DEV_CANDIDATES if p.is_file()), None)


@pytest.fixture(scope="session")
def dev_file() -> Path:
    path = find_dev_file()
    if path is None:
        pytest.skip("KorQuAD_v1.0_dev.json not found in ../shared/data/ or data/ "
                    "(run `python3 download.py` to fetch it)")
    return path


@pytest.fixture(scope="session")
def vocab_file() -> Path:
    return VOCAB_FILE


@pytest.fixture(scope="session")
def config_file() -> Path:
    return CONFIG_FILE


# Keep CPU tests deterministic and polite on a 2-core runner.
os.environ.setdefault("OMP_NUM_THREADS", "2")
