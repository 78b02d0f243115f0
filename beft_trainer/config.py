"""BeftConfig: what trains when no selection callback decides it."""

from __future__ import annotations

from dataclasses import dataclass, field

from .biases import ALL_BIASES, BIAS_TYPES
from .errors import BeftConfigError


@dataclass
class BeftConfig:
    """Which parameters ``BeftTrainer`` trains.

    Without a ``BiasSelectionCallback`` the trainable set is fixed: ``bias_types=("v",)`` (the
    BEFT paper's recommended default), ``("q", "v")``, or ``"all"`` for BitFit (every bias of the
    model, embeddings and LayerNorm included). With the callback, its ``candidates`` train while
    probing and ``bias_types`` must stay unset.
    """

    bias_types: tuple[str, ...] | str | None = field(
        default=None,
        metadata={
            "help": "Bias types to train when no selection callback is used: a tuple of "
            f"{', '.join(BIAS_TYPES)}, or 'all' for BitFit. Default: ('v',) without a callback."
        },
    )
    head_modules: tuple[str, ...] | None = field(
        default=None,
        metadata={
            "help": "Module names of the task head, trained in full (e.g. ('classifier',)). "
            "Default: detected (parameters outside the backbone, plus BERT's pooler bias)."
        },
    )
    train_head: bool = field(default=True, metadata={"help": "Train the task head alongside the biases."})
    frozen_dtype: str | None = field(
        default=None,
        metadata={
            "help": "Store frozen parameters in this dtype ('bfloat16', 'float16', or 'auto' to follow "
            "TrainingArguments bf16/fp16); trainable biases and the head stay fp32. Saves the fp32 copy "
            "of every frozen weight. None keeps the model's dtypes."
        },
    )
    add_missing_biases: bool = field(
        default=False,
        metadata={
            "help": "Add zero-initialised q/k/v biases to bias-free models (Llama, Mistral). "
            "The projection score is degenerate at b_pre = 0: select with 'magnitude' or 'fisher'."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.bias_types, str) and self.bias_types != ALL_BIASES:
            self.bias_types = tuple(t.strip() for t in self.bias_types.split(",") if t.strip())
        if isinstance(self.bias_types, (tuple, list)):
            self.bias_types = tuple(self.bias_types)
            unknown = [t for t in self.bias_types if t not in BIAS_TYPES]
            if unknown or not self.bias_types:
                raise BeftConfigError(
                    f"bias_types={self.bias_types!r}: use names among {', '.join(BIAS_TYPES)} or 'all'."
                )
        if self.head_modules is not None:
            self.head_modules = tuple(self.head_modules)

    @property
    def is_bitfit(self) -> bool:
        """Whether every bias of the model trains (``bias_types="all"``)."""
        return self.bias_types == ALL_BIASES
