"""What makes a stored adapter trustworthy: a checksum over its tensors and sane values.

The checksum catches a flipped bit or a damaged copy; the value checks catch what a checksum
recomputed by hand would let through (half-precision or integer deltas, NaN, fixes pointing
outside their bias), each with its own reason.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from ..errors import AdapterError
from .digest import update_with_tensor

if TYPE_CHECKING:
    from .format import BeftAdapter

__all__ = ["check_stored_values", "dtype_name", "tensor_checksum"]


def tensor_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order.

    A single changed bit anywhere changes it (short of a SHA-256 collision).
    """
    digest = hashlib.sha256(b"beft-adapter-checksum-v2\0")
    for name in sorted(tensors):
        update_with_tensor(digest, name, tensors[name])
    return digest.hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    """``float32`` for ``torch.float32``: the spelling ``beft_adapter.json`` records."""
    return str(dtype).removeprefix("torch.")


def check_stored_values(adapter: BeftAdapter, source: str) -> None:
    """Raise ``AdapterError`` naming the tensor unless every stored value is usable.

    Deltas and head values must have the dtype the metadata records and be finite; a fix must
    be int32 flat indices inside its bias, unique, with finite values of the delta's dtype.
    """
    recorded = adapter.metadata.dtypes
    for kind, tensors in (("bias", adapter.deltas), ("head", adapter.head)):
        for name, tensor in tensors.items():
            if dtype_name(tensor.dtype) != recorded.get(name):
                raise AdapterError(
                    f"{source}: {kind}/{name} is {dtype_name(tensor.dtype)}, but beft_adapter.json records "
                    f"{recorded.get(name)}; the file was edited or mixes two adapters."
                )
            _require_finite(tensor, f"{kind}/{name}", source)
    for name, (index, value) in adapter.fixes.items():
        _check_fix(name, index, value, adapter.deltas[name], source)


def _check_fix(name: str, index: torch.Tensor, value: torch.Tensor, delta: torch.Tensor, source: str) -> None:
    where = f"{source}: fix/{name}"
    if index.dtype != torch.int32 or index.dim() != 1:
        raise AdapterError(
            f"{where}/index must be a 1-D int32 tensor, not {dtype_name(index.dtype)} {tuple(index.shape)}."
        )
    if value.dtype != delta.dtype or value.shape != index.shape:
        raise AdapterError(
            f"{where}/value must be {dtype_name(delta.dtype)} {tuple(index.shape)} (like its index and delta), "
            f"not {dtype_name(value.dtype)} {tuple(value.shape)}."
        )
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= delta.numel()):
        raise AdapterError(
            f"{where}/index points outside the bias: indices {int(index.min())}..{int(index.max())}, "
            f"the bias has {delta.numel()} elements; the file was edited."
        )
    if index.unique().numel() != index.numel():
        raise AdapterError(f"{where}/index repeats an index; the file was edited.")
    _require_finite(value, f"fix/{name}/value", source)


def _require_finite(tensor: torch.Tensor, label: str, source: str) -> None:
    if not tensor.is_floating_point():
        raise AdapterError(
            f"{source}: {label} is {dtype_name(tensor.dtype)}; deltas and head values are floating point."
        )
    if not torch.isfinite(tensor).all():
        raise AdapterError(f"{source}: {label} holds NaN or infinite values; the adapter is corrupted or diverged.")
