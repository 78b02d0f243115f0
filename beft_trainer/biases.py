"""Which parameters of a model are its query/key/value/... bias vectors.

Bias types are found by *exact* parameter names relative to a transformer layer, per
architecture, never by substring: ``attention.output.dense.bias`` is the attention-output bias
of a BERT layer and nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import BiasTypeError
from .option_values import parse_type_list

#: Every bias type name the library knows, in a stable order.
BIAS_TYPES: tuple[str, ...] = ("q", "k", "v", "attn_out", "mlp_in", "mlp_out", "ln")
#: Projection types that can carry scaling vectors (see ``beft_trainer.vectors``).
PROJECTION_TYPES: tuple[str, ...] = ("q", "k", "v", "attn_out", "mlp_in", "mlp_out")
#: Every scaling-vector type: ``<projection>_scale_in`` (SSL) and ``<projection>_scale_out``.
SCALING_TYPES: tuple[str, ...] = tuple(f"{p}_scale_{side}" for p in PROJECTION_TYPES for side in ("in", "out"))
#: Every trainable vector type: the bias types, then the scaling types.
VECTOR_TYPES: tuple[str, ...] = BIAS_TYPES + SCALING_TYPES

#: Names accepted as a shorthand for "every bias of the model" (BitFit).
ALL_BIASES = "all"

_BERT_LIKE = {
    "attention.self.query.bias": "q",
    "attention.self.key.bias": "k",
    "attention.self.value.bias": "v",
    "attention.output.dense.bias": "attn_out",
    "intermediate.dense.bias": "mlp_in",
    "output.dense.bias": "mlp_out",
    "attention.output.LayerNorm.bias": "ln",
    "output.LayerNorm.bias": "ln",
}
_OPT_LIKE = {
    "self_attn.q_proj.bias": "q",
    "self_attn.k_proj.bias": "k",
    "self_attn.v_proj.bias": "v",
    "self_attn.out_proj.bias": "attn_out",
    "fc1.bias": "mlp_in",
    "fc2.bias": "mlp_out",
    "self_attn_layer_norm.bias": "ln",
    "final_layer_norm.bias": "ln",
}
_LLAMA_LIKE = {
    "self_attn.q_proj.bias": "q",
    "self_attn.k_proj.bias": "k",
    "self_attn.v_proj.bias": "v",
    "self_attn.o_proj.bias": "attn_out",
    # Bias-free in these models; named so that scaling vectors find the MLP's projections.
    "mlp.gate_proj.bias": "mlp_in",
    "mlp.up_proj.bias": "mlp_in",
    "mlp.down_proj.bias": "mlp_out",
}

#: Per ``config.model_type``: the regex of a layer's name prefix, and the exact names of the
#: bias vectors inside one layer with their type.
ARCHITECTURES: dict[str, tuple[str, dict[str, str]]] = {
    "bert": (r"encoder\.layer", _BERT_LIKE),
    "roberta": (r"encoder\.layer", _BERT_LIKE),
    "xlm-roberta": (r"encoder\.layer", _BERT_LIKE),
    "electra": (r"encoder\.layer", _BERT_LIKE),
    "mpnet": (
        r"encoder\.layer",
        {
            "attention.attn.q.bias": "q",
            "attention.attn.k.bias": "k",
            "attention.attn.v.bias": "v",
            "attention.attn.o.bias": "attn_out",
            "intermediate.dense.bias": "mlp_in",
            "output.dense.bias": "mlp_out",
            "attention.LayerNorm.bias": "ln",
            "output.LayerNorm.bias": "ln",
        },
    ),
    "distilbert": (
        r"transformer\.layer",
        {
            "attention.q_lin.bias": "q",
            "attention.k_lin.bias": "k",
            "attention.v_lin.bias": "v",
            "attention.out_lin.bias": "attn_out",
            "ffn.lin1.bias": "mlp_in",
            "ffn.lin2.bias": "mlp_out",
            "sa_layer_norm.bias": "ln",
            "output_layer_norm.bias": "ln",
        },
    ),
    "opt": (r"decoder\.layers", _OPT_LIKE),
    "gpt2": (
        r"h",
        {
            # c_attn's fused bias is split into three parameters by split_fused_qkv_bias().
            "attn.c_attn.bias_q": "q",
            "attn.c_attn.bias_k": "k",
            "attn.c_attn.bias_v": "v",
            "attn.c_proj.bias": "attn_out",
            "mlp.c_fc.bias": "mlp_in",
            "mlp.c_proj.bias": "mlp_out",
            "ln_1.bias": "ln",
            "ln_2.bias": "ln",
        },
    ),
    "qwen2": (r"layers", _LLAMA_LIKE),
    "llama": (r"layers", _LLAMA_LIKE),
    "mistral": (r"layers", _LLAMA_LIKE),
}

#: Projections that get a zero-initialised bias with ``add_missing_biases`` (bias-free models).
_MISSING_BIAS_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj"}


@dataclass(frozen=True)
class BiasVector:
    """One bias vector of one layer: its full parameter name, layer index and type."""

    name: str
    layer: int
    bias_type: str


@dataclass
class BiasLayout:
    """The bias vectors of a model grouped by type, each list ordered by layer."""

    model_type: str
    vectors: dict[str, list[BiasVector]] = field(default_factory=dict)
    other_biases: list[str] = field(default_factory=list)

    @property
    def types(self) -> tuple[str, ...]:
        """The vector types present in the model, in ``VECTOR_TYPES`` order."""
        return tuple(t for t in VECTOR_TYPES if self.vectors.get(t))

    @property
    def bias_types(self) -> tuple[str, ...]:
        """The bias types present in the model (what BitFit trains), in ``BIAS_TYPES`` order."""
        return tuple(t for t in BIAS_TYPES if self.vectors.get(t))

    def names(self, bias_types: Iterable[str]) -> list[str]:
        """Full parameter names of every vector of the given types."""
        return [v.name for t in bias_types for v in self.vectors.get(t, [])]

    def require(self, bias_types: Iterable[str]) -> None:
        """Raise ``BiasTypeError`` unless every type is a known name present in the model."""
        for bias_type in bias_types:
            if bias_type not in VECTOR_TYPES:
                raise BiasTypeError(f"Unknown vector type {bias_type!r}. Known types: {', '.join(VECTOR_TYPES)}.")
            if not self.vectors.get(bias_type):
                raise BiasTypeError(
                    f"The {self.model_type!r} model has no {bias_type!r} biases; it has: "
                    f"{', '.join(self.types) or 'none'}. Choose candidates among those, or for a "
                    "bias-free model pass BeftConfig(add_missing_biases=True)."
                )


def model_type_of(model: nn.Module) -> str:
    """The ``config.model_type`` of a transformers model (peft wrappers included)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise BiasTypeError(
            f"{type(model).__name__} has no config.model_type; beft_trainer works on transformers models."
        )
    return model_type


def _is_bias_parameter(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf == "bias" or leaf in ("bias_q", "bias_k", "bias_v")


def find_biases(model: nn.Module) -> BiasLayout:
    """Group every bias parameter of ``model`` by type, using exact per-architecture names."""
    model_type = model_type_of(model)
    if model_type not in ARCHITECTURES:
        raise BiasTypeError(
            f"Architecture {model_type!r} is not supported yet. Supported: {', '.join(sorted(ARCHITECTURES))}."
        )
    layer_prefix, table = ARCHITECTURES[model_type]
    layer_re = re.compile(rf"^(?:.*\.)?{layer_prefix}\.(\d+)\.(.+)$")
    layout = BiasLayout(model_type=model_type)
    first_name: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if not _is_bias_parameter(name):
            continue
        match = layer_re.match(name)
        bias_type = table.get(match.group(2)) if match else None
        shared_with = first_name.setdefault(id(param), name)
        if shared_with != name:
            if bias_type is not None or _typed(layer_re, table, shared_with):
                raise BiasTypeError(
                    f"{name} and {shared_with} are one shared tensor: freezing or rewinding one type would move the "
                    "other. Give each module its own bias (e.g. nn.Parameter(bias.detach().clone())) before training."
                )
            continue  # an untyped bias tied to another (BERT's MLM decoder bias) is listed once
        if bias_type is None:
            layout.other_biases.append(name)
            continue
        layout.vectors.setdefault(bias_type, []).append(BiasVector(name, int(match.group(1)), bias_type))
    for vectors in layout.vectors.values():
        vectors.sort(key=lambda v: v.layer)
    return layout


def _typed(layer_re: re.Pattern, table: dict[str, str], name: str) -> bool:
    match = layer_re.match(name)
    return match is not None and match.group(2) in table


def add_missing_biases(model: nn.Module, bias_types: str | Sequence[str] = ("q", "k", "v")) -> int:
    """Give bias-free q/k/v projections (Llama, Mistral) a zero-initialised bias.

    The output is unchanged at initialisation. The projection score is degenerate for such
    biases (``b_pre = 0`` makes every moved layer score 1), so select with ``movement``, ``attribution``,
    ``magnitude`` or ``fisher``. Returns the number of biases added.
    """
    bias_types = parse_type_list(bias_types, "add_missing_biases(bias_types)", tuple(_MISSING_BIAS_MODULES))
    model_type = model_type_of(model)
    layer_prefix, _ = ARCHITECTURES.get(model_type, (r"layers", {}))
    added = 0
    for bias_type in bias_types:
        suffix = _MISSING_BIAS_MODULES[bias_type]
        pattern = re.compile(rf"^(?:.*\.)?{layer_prefix}\.\d+\.{re.escape(suffix)}$")
        for name, module in model.named_modules():
            if pattern.match(name) and isinstance(module, nn.Linear) and module.bias is None:
                weight = module.weight
                module.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device))
                module.beft_added_bias = True  # so a second call (a new trainer, an adapter) knows they are added
                added += 1
    return added


def has_added_biases(model: nn.Module) -> bool:
    """Whether ``add_missing_biases`` gave any projection of ``model`` its bias."""
    return any(getattr(module, "beft_added_bias", False) for module in model.modules())


def split_fused_qkv_bias(model: nn.Module) -> int:
    """Split GPT-2's fused ``c_attn.bias`` into ``bias_q``/``bias_k``/``bias_v`` parameters.

    A slice of one tensor cannot be frozen exactly by an optimizer (its momentum and DeepSpeed's
    flat partitions see one tensor), three parameters can. The forward pass is unchanged; the
    state dict still holds the fused ``c_attn.bias``, so checkpoints stay loadable by
    ``GPT2Model.from_pretrained``. Returns the number of modules split.
    """
    from transformers.pytorch_utils import Conv1D

    split = 0
    for name, module in model.named_modules():
        if name.endswith("attn.c_attn") and type(module) is Conv1D and module.bias is not None:
            _split_conv1d_bias(module)
            split += 1
    return split


def _split_state_dict_hook(module, state_dict, prefix, local_metadata):
    parts = [state_dict.pop(prefix + f"bias_{t}") for t in "qkv"]
    state_dict[prefix + "bias"] = torch.cat(parts)
    return state_dict


def _split_load_pre_hook(state_dict, prefix, *args, **kwargs):
    fused = state_dict.pop(prefix + "bias", None)
    if fused is not None:
        for t, part in zip("qkv", fused.chunk(3), strict=True):
            state_dict[prefix + f"bias_{t}"] = part


def _split_conv1d_bias(module: nn.Module) -> None:
    fused = module._parameters.pop("bias")
    for t, part in zip("qkv", fused.detach().chunk(3), strict=True):
        module.register_parameter(f"bias_{t}", nn.Parameter(part.clone(), requires_grad=fused.requires_grad))
    module.bias = None  # read by Conv1D.__repr__ only
    module.forward = _split_bias_forward.__get__(module)
    module._register_state_dict_hook(_split_state_dict_hook)
    module._register_load_state_dict_pre_hook(_split_load_pre_hook)


def _split_bias_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """GPT-2 ``Conv1D.forward`` with the bias read from its three parts (bound onto the module)."""
    bias = torch.cat((self.bias_q, self.bias_k, self.bias_v))
    size_out = x.size()[:-1] + (self.nf,)
    x = torch.addmm(bias, x.view(-1, x.size(-1)), self.weight)
    return x.view(size_out)
