"""Memory-efficient bias-only training: frozen weights in bf16/fp16, trainable vectors in fp32."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .errors import BeftConfigError

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_frozen_dtype(frozen_dtype: str | None, args) -> torch.dtype | None:
    """The dtype frozen parameters are stored in: ``"auto"`` follows ``args.bf16``/``args.fp16``."""
    if frozen_dtype is None:
        return None
    if frozen_dtype == "auto":
        if getattr(args, "bf16", False):
            return torch.bfloat16
        if getattr(args, "fp16", False):
            return torch.float16
        return None
    if frozen_dtype not in _DTYPES:
        raise BeftConfigError(f"frozen_dtype={frozen_dtype!r}: use None, 'auto', 'bfloat16' or 'float16'.")
    if not (getattr(args, "bf16", False) or getattr(args, "fp16", False)):
        raise BeftConfigError(
            f"frozen_dtype={frozen_dtype!r} needs mixed precision (TrainingArguments(bf16=True) or fp16=True) "
            "so that autocast runs fp32 inputs against the half-precision weights."
        )
    return _DTYPES[frozen_dtype]


def cast_frozen_parameters(model: nn.Module, dtype: torch.dtype, trainable: Iterable[str]) -> int:
    """Store every parameter not in ``trainable`` in ``dtype``; trainable ones stay fp32.

    No fp32 copy of a frozen weight is kept. Returns the number of bytes saved.
    """
    keep = set(trainable)
    saved = 0
    for name, param in model.named_parameters():
        if name in keep or not param.is_floating_point() or param.dtype == dtype:
            continue
        before = param.element_size() * param.numel()
        param.data = param.data.to(dtype)
        saved += before - param.element_size() * param.numel()
    return saved
