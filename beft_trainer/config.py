"""Every option of the library, declared once with its help text.

``SelectionConfig`` holds what ``BiasSelectionCallback`` does, ``BeftConfig`` what ``BeftTrainer``
trains when nothing selects. Both are plain dataclasses that ``transformers.HfArgumentParser``
parses directly, so the recipes expose exactly these options, with these defaults and this help.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any

from .biases import ALL_BIASES, SCALING_TYPES, VECTOR_TYPES
from .errors import BeftConfigError
from .option_values import parse_type_list, require_bool, require_count_or_share, require_int
from .scores import SCORE_NAMES

__all__ = ["BeftConfig", "SelectionConfig"]


@dataclass(frozen=True)
class SelectionConfig:
    """How ``BiasSelectionCallback`` probes, scores and selects bias types.

    ``BiasSelectionCallback(probe_steps=50)`` builds one from keyword arguments;
    ``BiasSelectionCallback(SelectionConfig(...))`` takes it whole. The fields that shape a run
    (``SHAPING_FIELDS``) are stored in every checkpoint, and a resume that contradicts them is refused.
    """

    probe_steps: float = field(
        default=50,
        metadata={
            "help": "Optimizer steps during which every candidate type trains: a count (>= 1, e.g. 50) or a share "
            "of the run's steps (< 1, e.g. 0.2, as TrainingArguments reads warmup_ratio; rounded up). A longer probe "
            "is not reliably better: over the whole family at 0.02%%, 20%% of the run instead of 10%% gained 0.4 "
            "points on MiniLM SST-2 and lost 3.4 on CoLA (benchmarks/results/family_minilm_*cpu.md)."
        },
    )
    candidates: list[str] = field(
        default_factory=lambda: ["q", "k", "v"],
        metadata={
            "help": "Vector types to probe (a list, or a comma list 'q,v'): bias types "
            f"{', '.join(VECTOR_TYPES[:7])}, or scaling vectors <projection>_scale_in / _scale_out "
            "(e.g. v_scale_in: SSL on the value projection)."
        },
    )
    score: str | None = field(
        default=None,
        metadata={
            "help": "The score that selects: projection (BEFT), magnitude (mean absolute change), movement (total "
            "absolute change: magnitude times size), "
            "fisher (mean squared gradient while probing), attribution (training loss a type's updates removed "
            "while probing, to first order: comparable across kinds and sizes) or random (a baseline). "
            "Default: projection when every candidate is a bias type and there is no budget (the paper); "
            "movement when scaling vectors are candidates (projection cannot compare a vector that starts at 1 "
            "with one that starts at 0). Under a budget, decided when the model is known: attribution when the "
            "budget holds at most two of the smallest candidates (Adam moves every vector by about the learning "
            "rate per step, so movement hardly tells types of one size apart; attribution ranks them better), "
            "movement otherwise (its sets trained best at 0.1%%; benchmarks/results/family_*cpu.md)."
        },
    )
    top_k: int | None = field(
        default=None,
        metadata={
            "help": "How many types keep training after the switch. Default: 1 without a budget; "
            "with a budget, as many as fit."
        },
    )
    budget: float | None = field(
        default=None,
        metadata={
            "help": "Trainable-parameter budget of the selected vector types (the head is not counted): "
            "a count (>= 1, e.g. 5000) or a share of the model's parameters (< 1, e.g. 0.0002 for 0.02%%). "
            "The selection keeps the set of types with the highest total score that fits."
        },
    )
    scale_learning_rate: bool = field(
        default=True,
        metadata={
            "help": "When the selection keeps k > 1 types, train them at learning_rate / sqrt(k) after the switch: "
            "the rate that suits one type makes several diverge (five bias types at 1e-2 did on MiniLM SST-2, "
            "where BitFit's seven train well at 3e-3)."
        },
    )
    scale_probe_learning_rate: bool = field(
        default=True,
        metadata={
            "help": "While probing, train the n candidates at learning_rate / sqrt(n), the rule of the kept types; "
            "at the switch the kept types take their own rate. Probing the 19 family types at the full rate cost the "
            "kept types 0.4 (budget 0.02%%) and 3.1 points (0.1%%) on MiniLM SST-2, seeds 0-1 "
            "(benchmarks/results/family_minilm_cpu.md)."
        },
    )
    rewind: bool = field(
        default=True,
        metadata={"help": "Reset the bias types not selected to their pretrained values at the switch."},
    )
    inert_threshold: float | None = field(
        default=None,
        metadata={
            "help": "A bias vector whose gradient coherence |sum_t g_t| / sqrt(sum_t |g_t|^2) over probing tokens is "
            "below this is rounding noise; a type with every vector below it cannot change the output and is inert. "
            "Default: sqrt(eps) of the least precise dtype gradients are computed in (fp32 3.5e-4, bf16 0.088)."
        },
    )
    exclude_inert: bool = field(
        default=True, metadata={"help": "Exclude inert types from the selection (False: studies; still reported)."}
    )

    #: The fields a resumed run must share with its checkpoint.
    SHAPING_FIELDS = (
        "probe_steps", "candidates", "score", "top_k", "budget", "scale_learning_rate", "scale_probe_learning_rate",
        "rewind", "inert_threshold", "exclude_inert",
    )  # fmt: skip

    def __post_init__(self) -> None:
        # Frozen, so a field changed after the checks cannot skip them (dataclasses.replace re-runs them).
        owner, set_field = "BiasSelectionCallback", object.__setattr__.__get__(self)
        set_field("probe_steps", require_count_or_share(owner, "probe_steps", self.probe_steps))
        set_field("candidates", parse_type_list(self.candidates, "candidates", VECTOR_TYPES))
        if len(self.candidates) < 2:
            raise BeftConfigError(
                f"{owner} needs at least two candidates to choose from, got {self.candidates}; to train "
                f"one type without probing, use BeftConfig(bias_types={self.candidates})."
            )
        if self.score is not None and self.score not in SCORE_NAMES:
            raise BeftConfigError(f"{owner}: Unknown score {self.score!r}; choose one of {', '.join(SCORE_NAMES)}.")
        if self.top_k is not None:
            set_field("top_k", require_int(owner, "top_k", self.top_k, 1))
            if self.top_k >= len(self.candidates):
                raise BeftConfigError(
                    f"{owner}: top_k={self.top_k} must be below the number of candidates "
                    f"({len(self.candidates)}), or nothing is left out."
                )
        if self.budget is not None:
            set_field("budget", require_count_or_share(owner, "budget", self.budget, "parameter", "model"))
        for flag in ("rewind", "scale_learning_rate", "scale_probe_learning_rate", "exclude_inert"):
            set_field(flag, require_bool(owner, flag, getattr(self, flag)))
        threshold = self.inert_threshold
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0 < threshold < 1:
                raise BeftConfigError(
                    f"{owner}: inert_threshold must be a number in (0, 1) or None (sqrt(eps)), got {threshold!r}."
                )
            set_field("inert_threshold", float(threshold))

    @property
    def fixed_score(self) -> str | None:
        """The deciding score where the model does not matter: ``score``, or without a budget projection
        (movement with scaling candidates). None: a budget's default, settled when training starts."""
        if self.score is not None or self.budget is not None:
            return self.score
        return "movement" if any(t in SCALING_TYPES for t in self.candidates) else "projection"

    def probe_step_count(self, max_steps: int) -> int:
        """The probing steps of a run of ``max_steps`` steps (a share of it rounded up, at least 1)."""
        if self.probe_steps >= 1:
            return int(self.probe_steps)
        # round first: 0.1 * 30 is 3.0000000000000004 in floating point, and 3 steps are meant
        return max(1, math.ceil(round(self.probe_steps * max_steps, 6)))

    def describe_probe_steps(self, max_steps: int) -> str:
        """``probe_steps`` for messages: the count, or the share and the count it gives (``0.2 (20 steps)``)."""
        if self.probe_steps >= 1:
            return str(self.probe_steps)
        return f"{self.probe_steps} ({self.probe_step_count(max_steps)} steps)"

    def phase_learning_rate(self, learning_rate: float, types: int, probing: bool) -> float:
        """The base rate of each of ``types`` vector types training together in one phase of the run."""
        scaled = self.scale_probe_learning_rate if probing else self.scale_learning_rate
        return learning_rate / types**0.5 if scaled else learning_rate

    @property
    def max_types(self) -> int | None:
        """The most types the selection keeps (None: as many as the budget allows)."""
        return self.top_k if self.top_k is not None else (None if self.budget is not None else 1)

    def budget_parameters(self, total_parameters: int) -> int | None:
        """The budget as a parameter count for a model of ``total_parameters`` (None without a budget)."""
        if self.budget is None:
            return None
        return int(self.budget) if self.budget >= 1 else int(self.budget * total_parameters)

    def shaping_settings(self) -> dict[str, Any]:
        """The settings stored with a checkpoint (JSON-ready)."""
        values = {name: getattr(self, name) for name in self.SHAPING_FIELDS}
        values["candidates"], values["score"] = list(values["candidates"]), self.fixed_score
        return values

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """Names of every option (the keyword arguments ``BiasSelectionCallback`` accepts)."""
        return tuple(f.name for f in fields(cls))


@dataclass(frozen=True)
class BeftConfig:
    """Which parameters ``BeftTrainer`` trains.

    Without a ``BiasSelectionCallback`` the trainable set is fixed: ``bias_types=("v",)`` (the
    BEFT paper's recommended default), ``("q", "v")``, or ``"all"`` for BitFit (every bias of the
    model, embeddings and LayerNorm included). With the callback, its ``candidates`` train while
    probing and ``bias_types`` must stay unset.
    """

    bias_types: list[str] | None = field(
        default=None,
        metadata={
            "help": "Vector types to train when no selection callback is used: bias types "
            f"{', '.join(VECTOR_TYPES[:7])} or scaling types such as v_scale_in (a tuple or a comma "
            "list 'q,v'), or 'all' for BitFit. Default: v without a callback."
        },
    )
    head_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "The task head, trained in full: module names (e.g. classifier) or parameter names "
            "(e.g. bert.pooler.dense.bias). Default: detected (the parameters outside the backbone)."
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
            "The projection score is degenerate at b_pre = 0: select with 'movement', 'attribution', 'magnitude' or 'fisher'."
        },
    )

    def __post_init__(self) -> None:
        set_field = object.__setattr__.__get__(self)
        if self.bias_types == ALL_BIASES or self.bias_types == [ALL_BIASES]:
            set_field("bias_types", ALL_BIASES)
        else:
            set_field("bias_types", parse_type_list(self.bias_types, "BeftConfig.bias_types", VECTOR_TYPES))
        if self.head_modules is not None:
            modules = (self.head_modules,) if isinstance(self.head_modules, str) else tuple(self.head_modules)
            set_field("head_modules", modules)
        for flag in ("train_head", "add_missing_biases"):
            set_field(flag, require_bool("BeftConfig", flag, getattr(self, flag)))

    @property
    def is_bitfit(self) -> bool:
        """Whether every bias of the model trains (``bias_types="all"``)."""
        return self.bias_types == ALL_BIASES
