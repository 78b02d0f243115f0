"""Scores as pure functions, inert detection and ranking."""

from __future__ import annotations

import pytest
import torch

from beft_trainer import BeftConfigError, fisher_score, magnitude_score, projection_score, random_score
from beft_trainer.scores import rank_types


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


def test_random_is_seeded_and_differs_by_type():
    assert random_score("q", 3, seed=1) == random_score("q", 3, seed=1)
    assert random_score("q", 3, seed=1) != random_score("v", 3, seed=1)


def test_rank_types_skips_excluded_and_breaks_ties_by_order():
    assert rank_types({"q": 0.5, "k": 0.9, "v": 0.5}, ["k"], 1) == ["q"]
    assert rank_types({"q": 0.5, "k": 0.9, "v": 0.7}, [], 2) == ["k", "v"]
    with pytest.raises(BeftConfigError, match="inert"):
        rank_types({"k": 1.0}, ["k"], 1)
