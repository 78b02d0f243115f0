"""The base model's fingerprint: SHA-256 over every parameter but the task head.

An adapter only reproduces the trained model on the exact base it was trained from: any other
weight, anywhere, changes the outputs. So every parameter is hashed (name, dtype, shape, raw
bytes); the task head is left out because a fresh load initialises it at random and the adapter
replaces it. Hashing runs at about 1.5 GB/s per core (SHA-256 with the CPU's SHA instructions,
on several threads: ``hashlib`` releases the GIL), a small cost next to loading the model; see
docs/adapters.md for the measurement.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from ..distributed import gathered, is_zero_partitioned
from ..vectors import is_scaling_parameter
from .digest import update_with_tensor

__all__ = ["base_model_fingerprint", "combine_digests", "parameter_digests"]

_MAX_THREADS = 8


def base_model_fingerprint(
    model: nn.Module, exclude: Iterable[str] = (), base_values: Mapping[str, torch.Tensor] | None = None
) -> str:
    """SHA-256 fingerprint of every parameter of ``model`` but those named in ``exclude`` (the head).

    A single changed element of any parameter changes it with certainty short of a SHA-256
    collision (probability about 2**-128 for accidental changes): every byte of every parameter
    is hashed, with its name, dtype and shape. So a base loaded in another dtype does not match
    either: its outputs could not be reproduced exactly.

    Args:
        model: the base model (under ZeRO-3, partitioned parameters are gathered one at a time;
            every process must call it then).
        exclude: names of parameters left out: the task head, which a fresh load re-initialises.
        base_values: name -> value to hash instead of the model's current one (the pretrained
            value of a bias that has trained since, cast to the parameter's dtype).
    """
    return combine_digests(parameter_digests(model, exclude, base_values))


def parameter_digests(
    model: nn.Module,
    exclude: Iterable[str] = (),
    base_values: Mapping[str, torch.Tensor] | None = None,
    known: Mapping[str, bytes] | None = None,
) -> dict[str, bytes]:
    """Name -> SHA-256 digest of each parameter not in ``exclude``; ``known`` digests are reused, not recomputed."""
    exclude, base_values, known = set(exclude), base_values or {}, known or {}
    # Scaling vectors are not part of any base model: they are attached (as ones) for training.
    params = [
        (name, param)
        for name, param in model.named_parameters()
        if name not in exclude and not is_scaling_parameter(name)
    ]
    todo = [(name, param) for name, param in params if name not in known]
    values = [(name, _base_value(param, base_values.get(name))) for name, param in todo]
    if any(is_zero_partitioned(param) for _, param in todo):
        # Gathering is collective: every rank must gather the same parameters in the same order.
        computed = [_digest_gathered(name, value) for name, value in values]
    else:
        threads = max(1, min(_MAX_THREADS, os.cpu_count() or 1))
        with ThreadPoolExecutor(threads) as pool:
            computed = list(pool.map(lambda item: _digest(*item), values))
    digests = dict(zip([name for name, _ in todo], computed, strict=True))
    return {name: known[name] if name in known else digests[name] for name, _ in params}


def combine_digests(digests: Mapping[str, bytes]) -> str:
    """One hex fingerprint from per-parameter digests (in name order)."""
    digest = hashlib.sha256(b"beft-base-model-fingerprint-v2\0")
    for name in sorted(digests):
        digest.update(name.encode() + b"\0" + digests[name])
    return digest.hexdigest()


def _base_value(param: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    return param if base is None else base.detach().to(param.dtype)


def _digest(name: str, tensor: torch.Tensor) -> bytes:
    digest = hashlib.sha256()
    update_with_tensor(digest, name, tensor)
    return digest.digest()


def _digest_gathered(name: str, tensor: torch.Tensor) -> bytes:
    with gathered([tensor]):
        return _digest(name, tensor)
