"""How a stored vector is applied per row of a batch: the one place that knows the arithmetic.

A mixed batch gives every row its own version of a few vectors of a layer. Today that is the
bias of an ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2, whose fused q/k/v bias may be split
into ``bias_q/bias_k/bias_v`` by ``split_fused_qkv_bias``). A new kind of per-row vector (e.g. a
scaling vector ``s * x`` on a layer's input or output) joins here as one more field of
``RowVectors`` and one more step of ``row_forward``; nothing else needs to know.

Exactness: each row's output is the bit-identical output of the layer holding that row's bias.
The layer's own forward adds its bias *inside* the matrix product (``addmm(b, x, W)``, whose
accumulator starts from ``b``); adding a delta after the product (``x@W + b + delta``) rounds
differently (measured: up to ~8e-6 on MiniLM-sized layers). So the per-row path calls the same
kernel the layer calls, with a per-token bias matrix in place of the broadcast vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["RowVectors", "bias_parts", "row_forward", "rows_for_batch"]

#: GPT-2's fused q/k/v bias after ``split_fused_qkv_bias``: three parameters, concatenated in this order.
_SPLIT_BIAS = ("bias_q", "bias_k", "bias_v")


@dataclass
class RowVectors:
    """The vectors of one layer for each row of a batch (first dimension = rows)."""

    #: the full bias of each row's layer ([rows, out_features]); None keeps the layer's own bias.
    bias: torch.Tensor | None = None


def bias_parts(module: nn.Module) -> tuple[str, ...] | None:
    """Names of ``module``'s bias parameters, in the order its forward concatenates them.

    ``("bias",)`` for an ``nn.Linear`` or ``Conv1D`` with a bias, GPT-2's three split parts for a
    split ``c_attn``; ``None`` for any other module (LayerNorm, embeddings, ...), whose bias
    cannot be applied per row with the layer's own arithmetic.
    """
    from transformers.pytorch_utils import Conv1D

    if type(module) is Conv1D and all(isinstance(getattr(module, p, None), nn.Parameter) for p in _SPLIT_BIAS):
        return _SPLIT_BIAS
    if type(module) in (nn.Linear, Conv1D) and module.bias is not None:
        return ("bias",)
    return None


def rows_for_batch(rows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The per-row table index for a batch of ``batch_size``.

    ``generate`` with ``num_beams`` or ``num_return_sequences`` repeats each input row
    ``k`` times in place (``repeat_interleave``): the index is repeated the same way.
    """
    if batch_size == rows.numel():
        return rows
    if batch_size % rows.numel():
        raise ValueError(f"a batch of {batch_size} rows does not expand adapter_names of length {rows.numel()}")
    return rows.repeat_interleave(batch_size // rows.numel())


def row_forward(module: nn.Module, x: torch.Tensor, vectors: RowVectors) -> torch.Tensor:
    """``module(x)`` where row ``i`` of ``x`` sees the vectors in row ``i`` of ``vectors``.

    Follows the dispatch of the layer's own forward so that each row is bit-identical to the
    layer holding that row's vectors: ``Conv1D`` is ``addmm`` on ``x`` flattened; ``F.linear``
    is ``addmm`` for 2-D input and contiguous 3-D input, otherwise ``matmul`` then an in-place
    bias add.
    """
    from transformers.pytorch_utils import Conv1D

    bias = vectors.bias
    if bias is None:
        return module(x)
    if type(module) is Conv1D:
        flat = x.view(-1, x.size(-1))
        out = torch.addmm(_per_token(bias, flat.shape[0]), flat, module.weight)
        return out.view(*x.shape[:-1], module.nf)
    weight = module.weight
    if x.dim() == 2 or (x.dim() == 3 and x.is_contiguous()):
        flat = x.reshape(-1, x.shape[-1])
        out = torch.addmm(_per_token(bias, flat.shape[0]), flat, weight.t())
        return out.view(*x.shape[:-1], weight.shape[0])
    out = torch.matmul(x, weight.t())
    return out.add_(bias.view(bias.shape[0], *[1] * (x.dim() - 2), bias.shape[1]))


def _per_token(bias: torch.Tensor, tokens: int) -> torch.Tensor:
    """Each row's bias repeated for its tokens: [rows, out] -> [tokens, out] (rows are contiguous blocks)."""
    return bias.repeat_interleave(tokens // bias.shape[0], dim=0)
