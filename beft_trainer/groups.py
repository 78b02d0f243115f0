"""The optimizer parameter groups ``BeftTrainer`` builds: the head's two, one per bias type, BitFit's others."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .errors import BeftConfigError, BiasTypeError

#: The task head's parameters without and with weight decay.
HEAD_GROUP = "head"
HEAD_DECAY_GROUP = "head_decay"
HEAD_GROUPS = (HEAD_GROUP, HEAD_DECAY_GROUP)
#: BitFit: every bias that is not of a named type (embedding LayerNorm, ...).
OTHER_BIASES_GROUP = "other_biases"


def trainable_groups(
    bias_names: dict[str, list[str]],
    head: list[str],
    decay: set[str],
    other_biases: list[str] | None = None,
    train_head: bool = True,
    backbone_vectors: Sequence[str] = (),
) -> dict[str, list[str]]:
    """The optimizer parameter groups, in order: the head's two, one per bias type, BitFit's others.

    Args:
        bias_names: bias type -> parameter names of its vectors.
        head: the head's parameter names.
        decay: names of the parameters that take weight decay.
        other_biases: BitFit's untyped biases, or None.
        train_head: False leaves the head (its biases too) frozen.
        backbone_vectors: every vector of a bias or scaling type, which the head must not hold: it
            trains in full from the first step to the last, so such a vector could never freeze.

    Refuses groups with no vector besides the head (BitFit on a model without biases).
    """
    inside = [name for name in head if name in set(backbone_vectors)]
    if inside:
        raise BeftConfigError(
            f"The head holds {len(inside)} vectors of the backbone's bias types (e.g. {inside[0]}), which would train "
            "in full and never freeze: name only the task head in head_modules (e.g. ['classifier'])."
        )
    trained_head = head if train_head else []
    groups = {
        HEAD_GROUP: [name for name in trained_head if name not in decay],
        HEAD_DECAY_GROUP: [name for name in trained_head if name in decay],
        **bias_names,
    }
    if other_biases is not None:
        # A head bias is random at init: it belongs with the head, not with BitFit's deltas.
        groups[OTHER_BIASES_GROUP] = [name for name in other_biases if name not in head]
    groups = {name: names for name, names in groups.items() if names}
    if not bias_parameter_names(groups):
        raise BiasTypeError(
            "The model has no bias to train (BitFit found none): give its q/k/v projections biases with "
            "add_missing_biases=True, or train scaling vectors, e.g. bias_types=('v_scale_in',)."
        )
    return groups


def bias_parameter_names(groups: dict[str, list[str]]) -> set[str]:
    """Every parameter name in the groups that are not the head's."""
    return {name for group, names in groups.items() if group not in HEAD_GROUPS for name in names}


def head_parameter_names(groups: dict[str, list[str]]) -> list[str]:
    """Every parameter name in the head's groups."""
    return [name for group in HEAD_GROUPS for name in groups.get(group, [])]


def build_optimizer(
    groups: dict[str, list[str]],
    params: dict[str, nn.Parameter],
    weight_decay: float,
    optimizer_cls: Any,
    optimizer_kwargs: dict[str, Any],
) -> torch.optim.Optimizer:
    """``optimizer_cls`` over one parameter group per entry of ``groups``; only the head's decay group decays.

    Refuses an optimizer that builds its own groups (GaLore's ``params``, LOMO's ``model``, a factory such
    as Muon's): the switch freezes a bias type by its group's learning rate.
    """
    own_groups = [key for key in ("params", "model", "optimizer_dict") if key in optimizer_kwargs]
    if own_groups or not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        name = getattr(optimizer_cls, "__name__", repr(optimizer_cls))
        raise BeftConfigError(
            f"The optimizer {name} builds its own parameter groups (or is not a torch.optim.Optimizer class); "
            "BeftTrainer needs one group per bias type: use AdamW, SGD or another torch.optim.Optimizer."
        )
    optimizer = optimizer_cls(
        [
            {"params": [params[n] for n in names], "weight_decay": weight_decay if name == HEAD_DECAY_GROUP else 0.0}
            for name, names in groups.items()
        ],
        **optimizer_kwargs,
    )
    if optimizer.defaults.get("relative_step"):
        raise BeftConfigError(
            f"{optimizer_cls.__name__} with relative_step=True sets its own step size and ignores a group's learning "
            "rate, so frozen bias types would keep moving: pass relative_step=False and an lr "
            "(TrainingArguments(optim='adafactor') does)."
        )
    return optimizer


def freeze_all_but(model: nn.Module, trainable: list[str]) -> None:
    """Let only the parameters named in ``trainable`` take gradients."""
    keep = set(trainable)
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)
