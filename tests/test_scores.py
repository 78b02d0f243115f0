"""Scores as pure functions, inert detection and ranking."""

from __future__ import annotations

import pytest
import torch

from beft_trainer import (
    BeftConfigError,
    SelectionConfig,
    attribution_score,
    fisher_score,
    magnitude_score,
    movement_score,
    projection_score,
    random_score,
)
from beft_trainer.scores import default_budget_score, rank_types, select_within_budget


def test_projection_is_zero_without_movement_and_matches_the_formula():
    pre = [torch.tensor([1.0, 2.0]), torch.tensor([0.0, 3.0])]
    assert projection_score(pre, pre) == (0.0, [0.0, 0.0])
    post = [torch.tensor([2.0, 2.0]), torch.tensor([0.0, -3.0])]
    mean, per_layer = projection_score(pre, post)
    assert per_layer[0] == pytest.approx(1 - 6 / 8)
    assert per_layer[1] == pytest.approx(2.0)
    assert mean == pytest.approx((0.25 + 2.0) / 2)


def test_projection_is_degenerate_at_zero_pretrained_bias():
    _, per_layer = projection_score([torch.zeros(3)], [torch.tensor([0.1, 0.0, 0.0])])
    assert per_layer == [1.0]


def test_magnitude_and_fisher():
    mean, per_layer = magnitude_score([torch.zeros(2)], [torch.tensor([1.0, -3.0])])
    assert per_layer == [2.0] and mean == 2.0
    mean, per_layer = fisher_score([torch.tensor([4.0, 8.0]), torch.tensor([2.0, 2.0])], [2, 1])
    assert per_layer == [3.0, 2.0] and mean == 2.5
    with pytest.raises(BeftConfigError):
        fisher_score([torch.ones(2)], [0])


def test_movement_is_the_total_absolute_change_so_types_of_different_sizes_add_up():
    pre = [torch.zeros(2), torch.ones(4)]
    post = [torch.tensor([1.0, -3.0]), torch.tensor([1.5, 1.0, 0.0, 1.0])]
    total, per_layer = movement_score(pre, post)
    assert per_layer == [4.0, 1.5] and total == 5.5
    # magnitude times size: the mean |change| of a type of 2 layers x 3 scalars, times its 6 scalars
    wide_pre, wide_post = [torch.zeros(3)] * 2, [torch.full((3,), 0.5), torch.full((3,), -0.5)]
    assert movement_score(wide_pre, wide_post)[0] == magnitude_score(wide_pre, wide_post)[0] * 6


def test_attribution_averages_the_per_layer_loss_removed():
    assert attribution_score([0.25, -0.05]) == (0.1, [0.25, -0.05])


def test_random_is_seeded_and_differs_by_type():
    assert random_score("q", 3, seed=1) == random_score("q", 3, seed=1)
    assert random_score("q", 3, seed=1) != random_score("v", 3, seed=1)


def test_rank_types_skips_excluded_and_breaks_ties_by_order():
    assert rank_types({"q": 0.5, "k": 0.9, "v": 0.5}, ["k"], 1) == ["q"]
    assert rank_types({"q": 0.5, "k": 0.9, "v": 0.7}, [], 2) == ["k", "v"]
    with pytest.raises(BeftConfigError, match="inert"):
        rank_types({"k": 1.0}, ["k"], 1)


def _brute_force(scores, sizes, excluded, budget, max_types):
    import itertools

    eligible = [t for t in scores if t not in excluded]
    best = None
    for k in range(1, len(eligible) + 1):
        if max_types is not None and k > max_types:
            break
        for subset in itertools.combinations(eligible, k):
            used = sum(sizes[t] for t in subset)
            if used <= budget:
                key = (sum(scores[t] for t in subset), -used)
                if best is None or key > best[0]:
                    best = (key, set(subset))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_budgeted_choice_is_the_best_set_that_fits(seed):
    generator = torch.Generator().manual_seed(seed)
    types = [f"t{i}" for i in range(8)]
    scores = dict(zip(types, torch.rand(8, generator=generator).tolist(), strict=True))
    sizes = dict(zip(types, torch.randint(100, 1000, (8,), generator=generator).tolist(), strict=True))
    budget = int(torch.randint(1000, 3000, (1,), generator=generator))
    max_types = [None, 2][seed % 2]
    chosen = select_within_budget(scores, sizes, ["t0"], budget, max_types)
    expected_key, _ = _brute_force(scores, sizes, ["t0"], budget, max_types)
    assert sum(sizes[t] for t in chosen) <= budget and "t0" not in chosen
    assert (sum(scores[t] for t in chosen), -sum(sizes[t] for t in chosen)) == pytest.approx(expected_key)
    assert max_types is None or len(chosen) <= max_types


def test_a_budget_nothing_fits_says_the_sizes():
    with pytest.raises(BeftConfigError, match="No eligible type fits the budget of 50 parameters"):
        select_within_budget({"q": 1.0, "v": 2.0}, {"q": 64, "v": 64}, [], 50)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, "projection"),
        ({"candidates": "q,v,attn_out"}, "projection"),
        ({"candidates": "v,v_scale_in"}, "movement"),
        ({"budget": 0.001}, None),  # decided when the model's sizes are known
        ({"budget": 0.0002, "score": "movement"}, "movement"),  # a score given is kept
        ({"candidates": "v,v_scale_in", "score": "fisher"}, "fisher"),
    ],
)
def test_default_score_is_projection_for_biases_and_movement_across_kinds(options, expected):
    assert SelectionConfig(**options).fixed_score == expected


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        (4_542, "attribution"),  # one type of 2,304 fits: MiniLM at 0.02%
        (6_911, "attribution"),  # two fit, not three
        (6_912, "movement"),  # three fit
        (22_713, "movement"),  # MiniLM at 0.1%: nine fit
    ],
)
def test_a_budget_for_two_types_defaults_to_attribution_and_a_larger_one_to_movement(budget, expected):
    assert default_budget_score(budget, smallest_candidate=2_304) == expected


@pytest.mark.parametrize("option", ["scale_learning_rate", "scale_probe_learning_rate"])
def test_learning_rate_scalings_must_be_bools(option):
    with pytest.raises(BeftConfigError, match=option):
        SelectionConfig(**{option: "yes"})
