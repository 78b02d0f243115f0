"""Memory-efficient bias-only training: frozen matrices in bf16/fp16, every vector in fp32."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .distributed import is_zero_partitioned
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
    """Store frozen matrices (linear and embedding weights) in ``dtype``, every vector in fp32.

    Trainable parameters become fp32 even if the model was loaded in half precision. Frozen
    vectors (LayerNorm weights, frozen biases) stay fp32 too: a LayerNorm with a trainable fp32
    bias needs an fp32 weight beside it, and vectors are a negligible share of the memory. No
    fp32 copy of a frozen matrix is kept. Returns the number of bytes saved (negative if the
    model grew, as when a half-precision model's vectors are upcast).

    Under DeepSpeed this cast is redundant and ZeRO-3 partitions are left alone: with bf16/fp16
    enabled (``"auto"`` follows ``--bf16``) DeepSpeed stores every working copy in half precision
    (``zero.Init`` partitions at load, the engine casts the other parameters) and keeps fp32 master
    copies of the trained parameters only, in its optimizer, which is what this cast does without
    it. A ZeRO-3 parameter's ``data`` is an empty placeholder; recasting it would only change the
    dtype it is gathered into, mismatching its stored partition.
    """
    keep = set(trainable)
    saved = 0
    for name, param in model.named_parameters():
        if not param.is_floating_point() or is_zero_partitioned(param):
            continue
        target = dtype if name not in keep and param.dim() >= 2 else torch.float32
        if param.dtype == target:
            continue
        before = param.element_size() * param.numel()
        param.data = param.data.to(target)
        saved += before - param.element_size() * param.numel()
    return saved


def gradient_dtypes(args, model: nn.Module) -> set[torch.dtype]:
    """The dtypes gradients are computed in: the autocast dtype, and half-precision weights (frozen_dtype, ZeRO)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if getattr(args, "bf16", False):
        dtypes.add(torch.bfloat16)
    if getattr(args, "fp16", False):
        dtypes.add(torch.float16)
    return dtypes
