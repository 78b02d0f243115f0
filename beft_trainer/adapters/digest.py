"""Feeding tensors to a hash: their name, dtype, shape and raw bytes (shared by checksum and fingerprint)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["update_with_tensor"]


def update_with_tensor(digest: Any, label: str, tensor: torch.Tensor) -> None:
    """Feed ``label``, the dtype, the shape and every byte of ``tensor`` to a ``hashlib`` object.

    The dtype and shape go in too, so equal bytes read as another dtype or shape hash differently.
    """
    value = tensor.detach()
    if value.device.type != "cpu":
        value = value.cpu()
    value = value.contiguous().reshape(-1)
    digest.update(f"{label}\0{str(value.dtype).removeprefix('torch.')}\0{tuple(tensor.shape)}\0".encode())
    # Viewing as bytes copies nothing and works for dtypes numpy lacks (bfloat16).
    digest.update(memoryview(value.view(torch.uint8).numpy()))
