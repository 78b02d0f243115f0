"""Fine-tuning methods shared by the recipes: BEFT, fixed bias types, BitFit, full, LoRA, prefix tuning.

``--method`` takes one of ``beft``, ``bitfit``, ``full``, ``lora``, ``prefix``, or a comma list of
bias types (``v``, ``q,v``). Bias methods run on ``BeftTrainer``; ``full``, ``lora`` and ``prefix``
are baselines on a plain ``transformers.Trainer`` (peft wraps the model for the last two).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import Trainer

from .biases import ALL_BIASES, BIAS_TYPES
from .callback import BiasSelectionCallback
from .config import BeftConfig
from .errors import BeftConfigError
from .scores import SCORE_NAMES
from .trainer import BeftTrainer

#: Named methods; any comma list of ``BIAS_TYPES`` names is a method too (a fixed bias set).
METHODS = ("beft", "bitfit", "full", "lora", "prefix")

#: Learning rates that work per method. Bias-only training wants 1e-3..1e-2 (DESIGN.md: 1e-4
#: leaves single-type runs near the head-only baseline); BitFit moves every bias, so a little less.
DEFAULT_LEARNING_RATES = {
    "beft": 1e-2,
    "bias_types": 1e-2,
    "bitfit": 3e-3,
    "full": 5e-5,
    "lora": 1e-3,
    "prefix": 1e-2,
}


@dataclass(frozen=True)
class Method:
    """A parsed ``--method``: its kind (a ``METHODS`` name or ``bias_types``) and fixed bias types."""

    kind: str
    bias_types: tuple[str, ...] = ()

    @property
    def trains_biases_only(self) -> bool:
        """Whether ``BeftTrainer`` runs it (BEFT, BitFit, a fixed bias set)."""
        return self.kind in ("beft", "bitfit", "bias_types")

    @property
    def default_learning_rate(self) -> float:
        """The learning rate used when ``--learning_rate`` is not given."""
        return DEFAULT_LEARNING_RATES[self.kind]

    def __str__(self) -> str:
        return ",".join(self.bias_types) if self.kind == "bias_types" else self.kind


def parse_method(method: str) -> Method:
    """Parse ``--method``: a ``METHODS`` name, or a comma list of bias types such as ``q,v``."""
    name = method.strip().lower()
    if name in METHODS:
        return Method(name)
    bias_types = tuple(t.strip() for t in name.split(",") if t.strip())
    unknown = [t for t in bias_types if t not in BIAS_TYPES]
    if not bias_types or unknown or len(set(bias_types)) != len(bias_types):
        raise BeftConfigError(
            f"--method {method!r}: use one of {', '.join(METHODS)}, or distinct bias types among "
            f"{', '.join(BIAS_TYPES)} separated by commas (e.g. 'v' or 'q,v')."
        )
    return Method("bias_types", bias_types)


def _split_list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


@dataclass
class MethodArguments:
    """Which parameters train and how BEFT selects them (shared by ``run_glue`` and ``run_opt``)."""

    method: str = field(
        default="beft",
        metadata={
            "help": f"One of {', '.join(METHODS)}, or a comma list of bias types to train (e.g. 'v', 'q,v'). "
            "beft probes the candidates and keeps the best type; bitfit trains every bias."
        },
    )
    probe_steps: int = field(default=50, metadata={"help": "beft: optimizer steps of the probing phase."})
    candidates: str = field(
        default="q,k,v", metadata={"help": f"beft: comma list of bias types to probe, among {', '.join(BIAS_TYPES)}."}
    )
    score: str = field(
        default="projection", metadata={"help": f"beft: the score that selects, one of {', '.join(SCORE_NAMES)}."}
    )
    top_k: int = field(default=1, metadata={"help": "beft: how many bias types keep training after probing."})
    rewind: bool = field(
        default=True, metadata={"help": "beft: reset the bias types not selected to their pretrained values."}
    )
    inert_threshold: float = field(
        default=1e-3,
        metadata={"help": "beft: a type whose Fisher mass is below this fraction of the strongest is inert."},
    )
    frozen_dtype: str | None = field(
        default=None,
        metadata={"help": "Bias methods: store frozen weights in this dtype ('auto', 'bfloat16', 'float16')."},
    )
    lora_r: int = field(default=8, metadata={"help": "lora: rank of the update matrices."})
    lora_alpha: int = field(default=16, metadata={"help": "lora: scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "lora: dropout on the LoRA input."})
    num_virtual_tokens: int = field(default=20, metadata={"help": "prefix: number of prefix tokens per layer."})

    def __post_init__(self) -> None:
        self.parsed = parse_method(self.method)
        if self.parsed.kind == "beft":
            # Built once here so that a bad candidate/score/top_k fails before the model loads.
            self.selection_callback()

    def selection_callback(self) -> BiasSelectionCallback:
        """The ``BiasSelectionCallback`` for ``--method beft``."""
        return BiasSelectionCallback(
            probe_steps=self.probe_steps,
            candidates=_split_list(self.candidates),
            score=self.score,
            top_k=self.top_k,
            rewind=self.rewind,
            inert_threshold=self.inert_threshold,
        )

    def beft_config(self) -> BeftConfig:
        """The ``BeftConfig`` of a bias method (selection, fixed types or BitFit)."""
        bias_types = {"beft": None, "bitfit": ALL_BIASES, "bias_types": self.parsed.bias_types}[self.parsed.kind]
        return BeftConfig(bias_types=bias_types, frozen_dtype=self.frozen_dtype)


def wrap_with_peft(model, method_args: MethodArguments, task_type: str):
    """Wrap ``model`` with a LoRA or prefix-tuning adapter (peft); ``task_type`` is peft's, e.g. ``SEQ_CLS``."""
    try:
        import peft
    except ImportError as error:
        raise BeftConfigError(
            f"--method {method_args.method} needs peft: pip install 'beft-trainer[peft]'."
        ) from error
    if method_args.parsed.kind == "lora":
        # target_modules=None lets peft pick each architecture's attention projections.
        config = peft.LoraConfig(
            task_type=task_type,
            r=method_args.lora_r,
            lora_alpha=method_args.lora_alpha,
            lora_dropout=method_args.lora_dropout,
        )
    else:
        config = peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=method_args.num_virtual_tokens)
    return peft.get_peft_model(model, config)


def count_trainable(model) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts of a model (ZeRO-3 partitions counted in full)."""
    trainable = total = 0
    for param in model.parameters():
        numel = int(getattr(param, "ds_numel", param.numel()))
        total += numel
        trainable += numel if param.requires_grad else 0
    return trainable, total


def build_trainer(model, args, method_args: MethodArguments, peft_task_type: str, **trainer_kwargs: Any) -> Trainer:
    """The trainer for ``method_args.method``: ``BeftTrainer`` for bias methods, else a plain ``Trainer``."""
    method = method_args.parsed
    if method.trains_biases_only:
        callbacks = list(trainer_kwargs.pop("callbacks", None) or [])
        if method.kind == "beft":
            callbacks.append(method_args.selection_callback())
        return BeftTrainer(model, args, beft_config=method_args.beft_config(), callbacks=callbacks, **trainer_kwargs)
    if method.kind in ("lora", "prefix"):
        model = wrap_with_peft(model, method_args, peft_task_type)
    return Trainer(model, args, **trainer_kwargs)


def trainable_parameter_counts(trainer: Trainer) -> dict[str, int | float]:
    """``{"trainable", "total", "share"}`` of the run's final trainable set."""
    if isinstance(trainer, BeftTrainer):
        trainable, total = trainer.count_parameters(), trainer.total_parameters()
    else:
        trainable, total = count_trainable(trainer.model)
    return {"trainable": trainable, "total": total, "share": trainable / total if total else 0.0}
