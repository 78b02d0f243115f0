"""Names of the optimizer parameter groups ``BeftTrainer`` builds (besides one group per bias type)."""

from __future__ import annotations

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
) -> dict[str, list[str]]:
    """The optimizer parameter groups, in order: the head's two, one per bias type, BitFit's others.

    Args:
        bias_names: bias type -> parameter names of its vectors.
        head: the head's parameter names.
        decay: names of the parameters that take weight decay.
        other_biases: BitFit's untyped biases, or None.
        train_head: False leaves the head (its biases too) frozen.

    A head bias that is also a bias of the backbone (BERT's pooler) trains with the head only.
    """
    typed = {name for names in bias_names.values() for name in names}
    head = [name for name in head if name not in typed]
    trained_head = head if train_head else []
    groups = {
        HEAD_GROUP: [name for name in trained_head if name not in decay],
        HEAD_DECAY_GROUP: [name for name in trained_head if name in decay],
        **bias_names,
    }
    if other_biases is not None:
        # A head bias is random at init: it belongs with the head, not with BitFit's deltas.
        groups[OTHER_BIASES_GROUP] = [name for name in other_biases if name not in head]
    return {name: names for name, names in groups.items() if names}


def bias_parameter_names(groups: dict[str, list[str]]) -> set[str]:
    """Every parameter name in the groups that are not the head's."""
    return {name for group, names in groups.items() if group not in HEAD_GROUPS for name in names}


def head_parameter_names(groups: dict[str, list[str]]) -> list[str]:
    """Every parameter name in the head's groups."""
    return [name for group in HEAD_GROUPS for name in groups.get(group, [])]
