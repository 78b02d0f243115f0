"""Names of the optimizer parameter groups ``BeftTrainer`` builds (besides one group per bias type)."""

from __future__ import annotations

#: The task head's parameters without and with weight decay.
HEAD_GROUP = "head"
HEAD_DECAY_GROUP = "head_decay"
HEAD_GROUPS = (HEAD_GROUP, HEAD_DECAY_GROUP)
#: BitFit: every bias that is not of a named type (embedding LayerNorm, ...).
OTHER_BIASES_GROUP = "other_biases"
