"""Importance scores of a bias type, as pure functions of tensors.

Each score takes one entry per layer and returns ``(type_score, per_layer_scores)``; the type
score is the mean over layers, except ``movement``'s, a total. Higher means more important.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from .errors import BeftConfigError

#: Score names accepted by ``BiasSelectionCallback(score=...)``.
SCORE_NAMES: tuple[str, ...] = ("projection", "magnitude", "movement", "fisher", "attribution", "random")

LayerScores = tuple[float, list[float]]

#: Under a budget that holds at most this many of the smallest candidates, the default score is attribution.
SMALL_BUDGET_TYPES = 2


def default_budget_score(budget: int, smallest_candidate: int) -> str:
    """The score a budget of ``budget`` parameters selects by when none is given.

    One that holds at most ``SMALL_BUDGET_TYPES`` of the smallest candidate keeps types of about
    that size, among which movement hardly differs (Adam moves every vector by about the learning
    rate per step) and attribution ranks better; a larger one keeps a mix of sizes, whose sets
    movement judged better (benchmarks/results/family_*cpu.md).
    """
    return "attribution" if budget < (SMALL_BUDGET_TYPES + 1) * smallest_candidate else "movement"


def settle_budget(option: float, budget: int, sizes: dict[str, int], top_k: int | None) -> str:
    """The default score under a budget of ``budget`` parameters (``option`` as given) over candidates of
    ``sizes``; refuses a budget below every candidate, and one that holds them all with no ``top_k``."""
    listed = ", ".join(f"{t}={n:,}" for t, n in sizes.items())
    if min(sizes.values()) > budget:
        raise BeftConfigError(
            f"budget={option} allows {budget:,} parameters, but the smallest candidate has "
            f"{min(sizes.values()):,} ({listed}): raise the budget."
        )
    if top_k is None and sum(sizes.values()) <= budget:
        raise BeftConfigError(
            f"budget={option} allows {budget:,} parameters, which hold every candidate ({listed}; "
            f"{sum(sizes.values()):,} together), so nothing is left out: lower the budget, or train them all "
            "without a selection (BeftConfig(bias_types=...))."
        )
    return default_budget_score(budget, min(sizes.values()))


def require_rankable(score: str | None, pretrained: dict[str, Sequence[torch.Tensor]]) -> None:
    """Refuse the projection score over a type with an all-zero pretrained vector (type -> its vectors).

    There every vector that moves scores exactly 1 (added biases, zero-initialised ones), so the
    candidates' order would decide, not the data.
    """
    if score != "projection":
        return  # reads no vector: under CUDA each check would wait for the device
    zero = [t for t, vectors in pretrained.items() if any(not bool(v.any()) for v in vectors)]
    if zero:
        raise BeftConfigError(
            f"The projection score cannot rank {', '.join(zero)}: some of their pretrained vectors are all zero, "
            "and every vector that moves from zero scores 1. Select with score='magnitude', 'fisher', "
            "'attribution' or 'movement'."
        )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def projection_score(pre: Sequence[torch.Tensor], post: Sequence[torch.Tensor]) -> LayerScores:
    """BEFT's score: ``1 - <b_pre, b_post> / max(|b_pre|^2, |b_post|^2)`` per layer.

    Zero when a vector did not move. Degenerate when ``b_pre = 0`` (every moved layer scores 1).
    """
    per_layer = []
    for before, after in zip(pre, post, strict=True):
        before, after = before.double().flatten(), after.double().flatten()
        scale = torch.maximum(before.dot(before), after.dot(after))
        per_layer.append(0.0 if scale == 0 else float(1 - before.dot(after) / scale))
    return _mean(per_layer), per_layer


def magnitude_score(pre: Sequence[torch.Tensor], post: Sequence[torch.Tensor]) -> LayerScores:
    """BitFit's score: the mean absolute change ``mean(|b_post - b_pre|)`` per layer."""
    per_layer = [
        float((after.double() - before.double()).abs().mean()) for before, after in zip(pre, post, strict=True)
    ]
    return _mean(per_layer), per_layer


def movement_score(pre: Sequence[torch.Tensor], post: Sequence[torch.Tensor]) -> LayerScores:
    """The total absolute change ``sum(|b_post - b_pre|)`` per layer, and over the type (a sum, not a mean).

    Magnitude times size: additive over types, so a budget can add the movement of several types
    of different sizes, and a wider type that moves as much per scalar weighs more.
    """
    per_layer = [
        float((after.double() - before.double()).abs().sum()) for before, after in zip(pre, post, strict=True)
    ]
    return sum(per_layer), per_layer


def fisher_score(squared_grad_sums: Sequence[torch.Tensor], num_batches: Sequence[int]) -> LayerScores:
    """Empirical Fisher mass: the mean squared gradient of a layer's vector over probing batches."""
    if min(num_batches, default=0) <= 0:
        raise BeftConfigError("fisher_score needs at least one probing batch per layer.")
    per_layer = [float(s.double().mean() / n) for s, n in zip(squared_grad_sums, num_batches, strict=True)]
    return _mean(per_layer), per_layer


def attribution_score(removed_loss: Sequence[float]) -> LayerScores:
    """The training loss each layer's vector removed while probing, to first order (``-sum_t g_t . dtheta_t``).

    In units of loss for any kind and size of vector, and additive: the scores of a set of types
    add up to the loss that set removed, which is what a parameter budget trades against size.
    """
    per_layer = [float(v) for v in removed_loss]
    return _mean(per_layer), per_layer


def random_score(bias_type: str, num_layers: int, seed: int) -> LayerScores:
    """A seeded random score: the same on every rank, different per type (a baseline)."""
    generator = torch.Generator().manual_seed(seed * 7919 + sum(map(ord, bias_type)))
    per_layer = torch.rand(num_layers, generator=generator, dtype=torch.float64).tolist()
    return _mean(per_layer), per_layer


def gradient_coherence(squared_grad_sums: Sequence[torch.Tensor], token_squared_sums: Sequence[float]) -> list[float]:
    """Per vector: ``|sum_t g_t| / sqrt(sum_t |g_t|^2)``, pooled over the probing batches.

    ``g_t`` is the vector's gradient at token ``t``; the bias gradient is their sum. Gradients of
    real signal add up like a random walk or better (about 1); a gradient that is zero in exact
    arithmetic (a key bias under absolute positions: softmax ignores a shift of its row) is the
    rounding residue of a cancellation, about eps of the dtype it is computed in.
    """
    per_vector = []
    for squared, tokens in zip(squared_grad_sums, token_squared_sums, strict=True):
        summed = float(squared.double().sum())
        per_vector.append(math.sqrt(summed / tokens) if tokens > 0 else 0.0)
    return per_vector


def rounding_floor(dtypes: Iterable[torch.dtype]) -> float:
    """``sqrt(eps)`` of the least precise dtype: between rounding residue (~eps) and real signal (~1).

    3.5e-4 for float32, 0.031 for float16, 0.088 for bfloat16.
    """
    return math.sqrt(max((torch.finfo(d).eps for d in dtypes), default=torch.finfo(torch.float32).eps))


def find_inert(coherence_by_type: dict[str, Sequence[float]], floor: float) -> dict[str, str]:
    """Types whose every vector's gradient coherence is below ``floor``, with the reason.

    Such a type cannot change the model's output (its gradient is rounding noise in every layer),
    and Adam would amplify that noise into movement that any movement score mistakes for importance.
    """
    inert = {}
    for bias_type, coherence in coherence_by_type.items():
        strongest = max(coherence, default=0.0)
        if strongest < floor:
            inert[bias_type] = (
                f"gradient coherence at most {strongest:.1e} over layers, below the rounding floor {floor:.1e}: "
                "its gradient is rounding noise (the type cannot change the output), so its movement "
                "measures the optimizer, not the task"
            )
    return inert


def rank_types(scores: dict[str, float], excluded: Sequence[str], top_k: int) -> list[str]:
    """The ``top_k`` best types by score, skipping excluded ones; ties keep the order of ``scores`` (the candidates')."""
    eligible = [t for t in scores if t not in excluded]
    if not eligible:
        raise BeftConfigError("Every candidate bias type is inert; nothing can be selected.")
    return sorted(eligible, key=lambda t: -scores[t])[:top_k]


def select_within_budget(
    scores: dict[str, float],
    sizes: dict[str, int],
    excluded: Sequence[str],
    budget: int,
    max_types: int | None = None,
) -> list[str]:
    """The set of types with the highest total score whose sizes add up to at most ``budget``.

    An exact search (types are few): best total score first, then fewer parameters, then type
    order. ``max_types`` caps the set's size. Returned in type order.
    """
    eligible = [t for t in scores if t not in excluded and sizes[t] <= budget]
    if not eligible:
        raise BeftConfigError(
            f"No eligible type fits the budget of {budget:,} parameters (sizes: "
            + ", ".join(f"{t}={sizes[t]:,}" for t in scores if t not in excluded)
            + "); raise the budget."
        )
    order = sorted(eligible, key=lambda t: -scores[t])
    best: tuple[float, int, list[str]] = (float("-inf"), 0, [])

    def search(start: int, chosen: list[str], total: float, used: int) -> None:
        nonlocal best
        if chosen and (total, -used) > (best[0], -best[1]):
            best = (total, used, list(chosen))
        if max_types is not None and len(chosen) >= max_types:
            return
        remaining = sum(max(scores[t], 0.0) for t in order[start:])
        if total + remaining < best[0]:
            return
        for i in range(start, len(order)):
            candidate = order[i]
            if used + sizes[candidate] <= budget:
                search(i + 1, [*chosen, candidate], total + scores[candidate], used + sizes[candidate])

    search(0, [], 0.0, 0)
    return [t for t in scores if t in best[2]]
