"""Fine-tuning methods shared by the recipes: BEFT, fixed vector types, BitFit, full, and peft's methods.

``--method`` takes one of ``METHODS`` or a comma list of vector types (``v``, ``q,v``,
``v_scale_in``). Bias and scaling-vector methods run on ``BeftTrainer``; ``full`` and the peft
methods (``lora``, ``prefix``, ``prompt_tuning``, ``p_tuning``, ``ia3``, and ``peft_beft``, peft's own
fixed BEFT tuner) are baselines on a plain ``transformers.Trainer``.
"""

from __future__ import annotations

import inspect
from collections.abc import Collection
from dataclasses import dataclass, field, fields, replace
from typing import Any

import transformers
from transformers import Trainer

from ..biases import ALL_BIASES, VECTOR_TYPES, find_biases, model_type_of
from ..callback import BiasSelectionCallback
from ..config import BeftConfig, SelectionConfig
from ..errors import BeftConfigError, BiasTypeError
from ..trainer import BeftTrainer

#: Named methods; any comma list of ``VECTOR_TYPES`` names is a method too (a fixed set).
METHODS = ("beft", "bitfit", "full", "lora", "prefix", "prompt_tuning", "p_tuning", "ia3", "peft_beft")
#: The methods peft builds.
PEFT_METHODS = ("lora", "prefix", "prompt_tuning", "p_tuning", "ia3", "peft_beft")

#: The learning rates of the whole repository (recipes and benchmarks), per method. Bias-only
#: training wants 1e-3..1e-2 (DESIGN.md: 1e-4 leaves single-type runs near the head-only
#: baseline); BitFit moves every bias, so a little less.
DEFAULT_LEARNING_RATES = {
    "beft": 1e-2,
    "bias_types": 1e-2,
    "bitfit": 3e-3,
    "full": 5e-5,
    "lora": 1e-3,
    "prefix": 1e-2,
    # From benchmarks/results/quality_sweep_peft_methods_cpu.md (MiniLM, SST-2, 60 steps).
    "prompt_tuning": 1e-1,
    "p_tuning": 3e-2,
    "ia3": 3e-2,
    "peft_beft": 1e-2,  # the same function as a fixed "v": the same rate
}


#: Causal LMs (``run_opt.py``) differ for bias methods only. On the real Qwen2.5-0.5B (prompt SST-2,
#: 16 steps of 4, benchmarks/results/real_decoder_qwen2.5-coder-0.5b.md) BEFT at 1e-2 fell from 0.656
#: zero-shot to 0.562 and 3e-3 to 0.609, 1e-3 kept 0.641: a label-word likelihood moves far faster than
#: an encoder's fresh head, and large steps on v mostly shift the prior between label words.
DECODER_LEARNING_RATES = DEFAULT_LEARNING_RATES | {"beft": 1e-3, "bias_types": 1e-3}

#: The table each kind of model reads its defaults from (the recipes' ``model_kind``).
LEARNING_RATES_BY_MODEL_KIND = {"encoder": DEFAULT_LEARNING_RATES, "decoder": DECODER_LEARNING_RATES}


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
        """The learning rate used when ``--learning_rate`` is not given (encoders)."""
        return DEFAULT_LEARNING_RATES[self.kind]

    def learning_rate_for(self, model_kind: str) -> float:
        """The default learning rate for a kind of model: ``encoder`` or ``decoder``."""
        return LEARNING_RATES_BY_MODEL_KIND[model_kind][self.kind]

    def __str__(self) -> str:
        return ",".join(self.bias_types) if self.kind == "bias_types" else self.kind


def parse_method(method: str) -> Method:
    """Parse ``--method``: a ``METHODS`` name, or a comma list of bias types such as ``q,v``."""
    name = method.strip().lower()
    if name in METHODS:
        return Method(name)
    bias_types = tuple(t.strip() for t in name.split(",") if t.strip())
    unknown = [t for t in bias_types if t not in VECTOR_TYPES]
    if not bias_types or unknown or len(set(bias_types)) != len(bias_types):
        raise BeftConfigError(
            f"--method {method!r}: use one of {', '.join(METHODS)}, or distinct vector types among "
            f"{', '.join(VECTOR_TYPES)} separated by commas (e.g. 'v', 'q,v' or 'v_scale_in')."
        )
    return Method("bias_types", bias_types)


@dataclass
class MethodArguments:
    """Which method trains (shared by ``run_glue`` and ``run_opt``), and the peft baselines' options.

    BEFT's options come from ``SelectionConfig`` and what bias methods train from ``BeftConfig``:
    the recipes parse both directly (``--help`` lists them).
    """

    method: str = field(
        default="beft",
        metadata={
            "help": f"One of {', '.join(METHODS)}, or a comma list of bias types to train (e.g. 'v', 'q,v'). "
            "beft probes the candidates and keeps the best type; bitfit trains every bias."
        },
    )
    lora_r: int = field(default=8, metadata={"help": "lora: rank of the update matrices."})
    lora_alpha: int = field(default=16, metadata={"help": "lora: scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "lora: dropout on the LoRA input."})
    num_virtual_tokens: int = field(
        default=20, metadata={"help": "prefix, prompt_tuning, p_tuning: number of virtual tokens."}
    )

    def __post_init__(self) -> None:
        self.parsed = parse_method(self.method)
        # peft would take r=0 or a dropout of 1.5 and fail inside the model load, or train nothing.
        for name in ("lora_r", "lora_alpha", "num_virtual_tokens"):
            if getattr(self, name) < 1:
                raise BeftConfigError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if not 0 <= self.lora_dropout < 1:
            raise BeftConfigError(f"--lora_dropout must lie in [0, 1), got {self.lora_dropout}.")


#: The methods that read each peft option: given to any other, it would be ignored silently.
_READERS = {
    "lora_r": ("lora",),
    "lora_alpha": ("lora",),
    "lora_dropout": ("lora",),
    "num_virtual_tokens": ("prefix", "prompt_tuning", "p_tuning"),
}


def _changed_options(config: Any) -> set[str]:
    """The options of a dataclass that differ from their defaults: all a caller without a command line says."""
    default = type(config)()
    return {f.name for f in fields(config) if getattr(config, f.name) != getattr(default, f.name)}


def _ignored_options(method: Method, given: Collection[str]) -> list[str]:
    """The given options, in declaration order, that ``method`` does not read."""
    unread = [f.name for f in fields(SelectionConfig)] if method.kind != "beft" else []
    unread += [f.name for f in fields(BeftConfig)] if not method.trains_biases_only else []
    unread += [name for name, readers in _READERS.items() if method.kind not in readers]
    return [f"--{name}" for name in unread if name in given]


def configure_method(
    method_args: MethodArguments, selection: SelectionConfig, beft: BeftConfig, given: Collection[str] | None = None
) -> BeftConfig:
    """``beft`` with ``bias_types`` set from ``--method``; refuse given options the method would ignore.

    ``given``: the options a command line or config file gave, whatever their value (the recipes
    pass them); without it, the options that differ from their defaults.
    ``--method`` is the one place that says what trains: ``--bias_types`` next to it is refused.
    """
    method = method_args.parsed
    if beft.bias_types is not None:
        raise BeftConfigError(
            f"--bias_types {_type_names(beft.bias_types)}: choose the trained bias types with --method "
            "(e.g. --method q,v, or --method bitfit for every bias), not --bias_types."
        )
    if given is None:
        given = _changed_options(method_args) | _changed_options(selection) | _changed_options(beft)
    ignored = _ignored_options(method, given)
    if ignored:
        raise BeftConfigError(
            f"--method {method}: {', '.join(ignored)} would be ignored: drop them, or choose a --method that reads them."
        )
    bias_types = {"beft": None, "bitfit": ALL_BIASES, "bias_types": method.bias_types}.get(method.kind)
    return replace(beft, bias_types=bias_types)


def _type_names(bias_types: str | tuple[str, ...]) -> str:
    return bias_types if isinstance(bias_types, str) else ",".join(bias_types)


#: The projections (as vector types) LoRA, IA3 and peft's BEFT tuner target where peft has no default for an
#: architecture: peft's own defaults elsewhere (BERT: LoRA query/value, IA3 key/value/feed-forward output, BEFT value).
PEFT_TARGET_TYPES = {"lora": ("q", "v"), "ia3": ("k", "v", "mlp_out"), "peft_beft": ("v",)}
#: IA3's feed-forward modules (scaled on their input) among its targets.
IA3_FEEDFORWARD_TYPES = ("mlp_out",)


def peft_target_modules(model, kind: str) -> dict[str, list[str]]:
    """``target_modules`` (and IA3's ``feedforward_modules``) for a model whose architecture peft has no default for.

    Empty where peft has one. Elsewhere the modules come from the projections beft_trainer knows for the
    architecture (``find_biases``): the modules that own the biases of ``PEFT_TARGET_TYPES[kind]``.
    """
    from peft.utils import constants

    defaults = {
        "lora": constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
        "ia3": constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
        "peft_beft": constants.TRANSFORMERS_MODELS_TO_BEFT_TARGET_MODULES_MAPPING,
    }
    model_type = model_type_of(model)
    if kind not in defaults or model_type in defaults[kind]:
        return {}
    try:
        layout = find_biases(model)
    except BiasTypeError as error:
        raise BeftConfigError(
            f"--method {kind}: neither peft nor beft-trainer knows the projections of {model_type!r} ({error}); "
            "use another --method."
        ) from error
    missing = [t for t in PEFT_TARGET_TYPES[kind] if not layout.vectors.get(t)]
    if missing:
        raise BeftConfigError(
            f"--method {kind}: peft has no default target modules for {model_type!r}, and its {', '.join(missing)} "
            "projections have no bias to find them by; use another --method."
        )

    def modules(types: tuple[str, ...]) -> list[str]:
        return [name.removesuffix(".bias") for name in layout.names(types)]

    targets = {"target_modules": modules(PEFT_TARGET_TYPES[kind])}
    if kind == "ia3":
        targets["feedforward_modules"] = modules(IA3_FEEDFORWARD_TYPES)
    return targets


def require_prefix_support(model) -> None:
    """Refuse prefix tuning where peft cannot run it: it passes ``past_key_values`` to the model (or its
    backbone), which transformers 5.24 renamed ``cache``."""
    forwards = (model.forward, getattr(model, "base_model", model).forward)
    if not any("past_key_values" in inspect.signature(forward).parameters for forward in forwards):
        raise BeftConfigError(
            f"--method prefix: peft's prefix tuning passes past_key_values, which {type(model).__name__} of "
            f"transformers {transformers.__version__} no longer takes; use --method prompt_tuning or p_tuning "
            "(or transformers<5.24)."
        )


def wrap_with_peft(model, method_args: MethodArguments, task_type: str):
    """Wrap ``model`` with the peft method of ``--method``; ``task_type`` is peft's, e.g. ``SEQ_CLS``.

    Target modules are peft's per-architecture defaults (LoRA, IA3 and peft's BEFT tuner pick the
    attention projections, IA3 also the feed-forward output), or ``peft_target_modules`` where peft
    has none (MPNet).
    """
    try:
        import peft
    except ImportError as error:
        raise BeftConfigError(
            f"--method {method_args.method} needs peft: pip install 'beft-trainer[peft]'."
        ) from error
    kind, tokens = method_args.parsed.kind, method_args.num_virtual_tokens
    if kind == "prefix":
        require_prefix_support(model)
    targets = peft_target_modules(model, kind)
    configs = {
        "lora": lambda: peft.LoraConfig(
            task_type=task_type, r=method_args.lora_r, lora_alpha=method_args.lora_alpha,
            lora_dropout=method_args.lora_dropout, **targets,
        ),
        "prefix": lambda: peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=tokens),
        "prompt_tuning": lambda: peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=tokens),
        "p_tuning": lambda: peft.PromptEncoderConfig(task_type=task_type, num_virtual_tokens=tokens),
        "ia3": lambda: peft.IA3Config(task_type=task_type, **targets),
        "peft_beft": lambda: peft.BeftConfig(task_type=task_type, **targets),
    }  # fmt: skip
    return peft.get_peft_model(model, configs[kind]())


def build_trainer(
    model,
    args,
    method_args: MethodArguments,
    selection_config: SelectionConfig,
    beft_config: BeftConfig,
    peft_task_type: str,
    **trainer_kwargs: Any,
) -> Trainer:
    """The trainer for ``--method``: ``BeftTrainer`` for bias methods (BEFT adds its callback), else a plain one.

    ``beft_config`` comes from ``configure_method``; ``peft_task_type`` is peft's (``SEQ_CLS``, ``CAUSAL_LM``).
    """
    method = method_args.parsed
    if method.trains_biases_only:
        callbacks = list(trainer_kwargs.pop("callbacks", None) or [])
        if method.kind == "beft":
            callbacks.append(BiasSelectionCallback(selection_config))
        return BeftTrainer(model, args, beft_config=beft_config, callbacks=callbacks, **trainer_kwargs)
    if method.kind in PEFT_METHODS:
        model = wrap_with_peft(model, method_args, peft_task_type)
    return Trainer(model, args, **trainer_kwargs)
