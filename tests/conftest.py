"""Test set-up: offline Hugging Face, the helpers importable, and a clean environment per test."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _clean_accelerate_environment():
    """accelerate leaves ACCELERATE_USE_DEEPSPEED (and friends) behind after a DeepSpeed run."""
    before = dict(os.environ)
    yield
    for key in [k for k in os.environ if k.startswith("ACCELERATE_") and k not in before]:
        del os.environ[key]
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
