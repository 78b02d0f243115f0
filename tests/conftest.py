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


SHARED_MEMORY = "/dev/shm"
DEEPSPEED_BUFFER_PREFIX = f"deepspeed_allreduce_buffer_{os.getuid()}_"


def _deepspeed_buffers() -> set[str]:
    if not os.path.isdir(SHARED_MEMORY):
        return set()
    return {name for name in os.listdir(SHARED_MEMORY) if name.startswith(DEEPSPEED_BUFFER_PREFIX)}


@pytest.fixture(autouse=True, scope="session")
def _remove_deepspeed_shared_memory():
    """DeepSpeed's CPU all-reduce maps a 66 MB buffer per rank in /dev/shm and never unlinks it.

    Every process group the backend tests start would leave ~1 GB per run of the suite behind
    (18 GB had piled up here, leaving 3 GB of RAM); remove the ones this session created.
    """
    before = _deepspeed_buffers()
    yield
    for name in _deepspeed_buffers() - before:
        try:
            os.unlink(os.path.join(SHARED_MEMORY, name))
        except FileNotFoundError:
            pass
