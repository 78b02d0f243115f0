"""Exact bias deltas: ``pretrained + delta`` gives the trained value bit for bit."""

from __future__ import annotations

import torch

__all__ = ["apply_delta", "exact_delta"]


def apply_delta(
    pretrained: torch.Tensor,
    delta: torch.Tensor,
    dtype: torch.dtype | None = None,
    fix: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``pretrained + delta`` in the delta's precision, cast to ``dtype``, with the fixed elements set."""
    value = (pretrained.to(delta.dtype) + delta.to(pretrained.device)).to(dtype or pretrained.dtype)
    if fix is not None and fix[0].numel():
        index, fixed = fix
        value = value.flatten().index_copy(0, index.long().to(value.device), fixed.to(value)).view_as(value)
    return value


def exact_delta(
    pretrained: torch.Tensor, trained: torch.Tensor
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """A delta (in ``trained``'s dtype) and the fix that make ``apply_delta`` give ``trained`` bit for bit.

    ``trained - pretrained`` rounds, and adding it back can land one ulp away from ``trained``;
    such elements are nudged by one ulp. Where the delta's ulp is coarser than the result's (a
    bias crossing zero) no delta of that dtype adds back exactly: those few elements are the fix,
    ``(flat indices, trained values)``, or ``None`` when there are none.
    """
    pretrained, trained = pretrained.detach().cpu(), trained.detach().cpu()
    dtype = trained.dtype
    delta = trained - pretrained.to(dtype)
    if dtype in (torch.float32, torch.float64):
        for _ in range(2):
            landed = apply_delta(pretrained, delta, dtype)
            wrong = landed != trained
            if not wrong.any():
                return delta, None
            towards = torch.where(landed < trained, torch.inf, -torch.inf).to(dtype)
            delta = torch.where(wrong, torch.nextafter(delta, towards), delta)
    index = (apply_delta(pretrained, delta, dtype) != trained).flatten().nonzero().flatten()
    if not index.numel():
        return delta, None
    return delta, (index.to(torch.int32), trained.flatten()[index].clone())
