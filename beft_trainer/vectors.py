"""Trainable scaling vectors on linear layers (the subspace-tuning family's SSL and SSB).

For a linear layer ``y = W x + b`` a scaling vector of the input, ``s_in`` (initialised to 1),
trains ``y = W (s_in * x) + b`` (SSL: ``W diag(s_in)``); one of the output, ``s_out``, trains
``y = s_out * (W x) + b``. SSB is both on one layer. Each is a vector type of its own, named after
the projection: ``v_scale_in``, ``v_scale_out``, ... found through the same per-architecture tables
as the biases, so they join the same catalog (``BiasLayout``), groups, selection and adapters.

The weights are never copied or re-materialised: the activations are scaled, so a frozen
bf16 or ZeRO-3-partitioned ``W`` stays as it is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .biases import (
    ARCHITECTURES,
    PROJECTION_TYPES,
    SCALING_TYPES,
    BiasLayout,
    BiasVector,
    add_missing_biases,
    find_biases,
    has_added_biases,
    model_type_of,
    split_fused_qkv_bias,
)
from .errors import BiasTypeError

#: Parameter names of the vectors on their module.
SCALE_PARAMETERS = {"in": "beft_scale_in", "out": "beft_scale_out"}


def split_scaling_type(vector_type: str) -> tuple[str, str]:
    """``"v_scale_in"`` -> ``("v", "in")``."""
    projection, _, side = vector_type.rpartition("_scale_")
    if projection not in PROJECTION_TYPES or side not in SCALE_PARAMETERS:
        raise BiasTypeError(f"{vector_type!r} is not a scaling-vector type; known: {', '.join(SCALING_TYPES)}.")
    return projection, side


def _projection_modules(model: nn.Module, projection: str) -> list[tuple[str, int, nn.Module]]:
    """``(module name, layer, module)`` of every linear layer of one projection type, by layer."""
    model_type = model_type_of(model)
    layer_prefix, table = ARCHITECTURES[model_type]
    suffixes = [name.removesuffix(".bias") for name, kind in table.items() if kind == projection]
    suffixes = [s for s in suffixes if not s.startswith("attn.c_attn")]  # GPT-2's fused q/k/v
    pattern = re.compile(rf"^(?:.*\.)?{layer_prefix}\.(\d+)\.({'|'.join(map(re.escape, suffixes))})$")
    found = []
    for name, module in model.named_modules():
        match = pattern.match(name) if suffixes else None
        if match and hasattr(module, "weight"):
            found.append((name, int(match.group(1)), module))
    return sorted(found, key=lambda item: item[1])


def attach_scaling_vectors(model: nn.Module, vector_types: Iterable[str]) -> int:
    """Give each layer of the named types its scaling vector (ones: the output is unchanged).

    Idempotent. Returns the number of vectors added. Raises ``BiasTypeError`` when the model has
    no layer for a type (GPT-2's q/k/v live in one fused layer: scale ``attn_out``/``mlp_*`` there).
    """
    added = 0
    for vector_type in vector_types:
        projection, side = split_scaling_type(vector_type)
        modules = _projection_modules(model, projection)
        if not modules:
            raise BiasTypeError(
                f"The {model_type_of(model)!r} model has no separate {projection!r} projection to scale "
                f"({vector_type!r}; GPT-2's q/k/v are one fused layer): choose among "
                f"{', '.join(supported_scaling_types(model))}."
            )
        for _, _, module in modules:
            added += _attach(module, side)
    return added


def _attach(module: nn.Module, side: str) -> int:
    name = SCALE_PARAMETERS[side]
    if getattr(module, name, None) is not None:
        return 0
    weight = module.weight
    features = _features(module)[0 if side == "in" else 1]
    module.register_parameter(name, nn.Parameter(torch.ones(features, device=weight.device, dtype=torch.float32)))
    if not getattr(module, "_beft_scaled", False):
        for other in SCALE_PARAMETERS.values():
            if not hasattr(module, other):
                module.register_parameter(other, None)
        module.forward = _scaled_forward.__get__(module)
        module._beft_scaled = True
    return 1


def _features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or GPT-2 ``Conv1D`` (full size under ZeRO-3)."""
    shape = tuple(getattr(module.weight, "ds_shape", module.weight.shape))
    return (shape[1], shape[0]) if isinstance(module, nn.Linear) else (shape[0], shape[1])


def _scaled_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Forward of a linear layer with scaling vectors (bound onto the module)."""
    scale_in, scale_out = self.beft_scale_in, self.beft_scale_out
    if scale_in is not None:
        x = (x * scale_in).to(x.dtype)
    bias = getattr(self, "bias", None)
    weight = self.weight if isinstance(self, nn.Linear) else self.weight.t()
    if scale_out is None:
        return F.linear(x, weight, bias)
    out = F.linear(x, weight)
    scaled = out * scale_out
    if bias is not None:
        scaled = scaled + bias
    return scaled.to(out.dtype)


def find_scaling_vectors(model: nn.Module) -> dict[str, list[BiasVector]]:
    """The scaling vectors attached to ``model``, by type, each list ordered by layer."""
    found: dict[str, list[BiasVector]] = {}
    for vector_type in SCALING_TYPES:
        projection, side = split_scaling_type(vector_type)
        for module_name, layer, module in _projection_modules(model, projection):
            if getattr(module, SCALE_PARAMETERS[side], None) is not None:
                name = f"{module_name}.{SCALE_PARAMETERS[side]}"
                found.setdefault(vector_type, []).append(BiasVector(name, layer, vector_type))
    return found


def prepare_model(model: nn.Module, add_biases: bool = False, scaling_types: Iterable[str] = ()) -> BiasLayout:
    """Give ``model`` the parameter layout training uses, and return its vector catalog.

    GPT-2's fused q/k/v bias is split into three parameters, zero q/k/v biases are added to a
    bias-free model when ``add_biases``, and scaling vectors (ones) are attached. The trainer
    and the adapter loader both call it, so an adapter's names meet the same layout. Idempotent.
    """
    split_fused_qkv_bias(model)
    if add_biases and not add_missing_biases(model) and not has_added_biases(model):
        raise BiasTypeError(
            f"add_missing_biases=True, but this {model_type_of(model)!r} model has no bias-free q/k/v projection "
            "to add one to (it adds them to Llama/Mistral-style attention): leave it False."
        )
    scaling = [t for t in scaling_types if t in SCALING_TYPES]
    if scaling:
        attach_scaling_vectors(model, scaling)
    return find_vectors(model)


def find_vectors(model: nn.Module) -> BiasLayout:
    """The catalog of every trainable vector of ``model``: its biases and its attached scaling vectors."""
    layout = find_biases(model)
    layout.vectors.update(find_scaling_vectors(model))
    return layout


def is_scaling_parameter(name: str) -> bool:
    """Whether a parameter name is a scaling vector's (``...beft_scale_in``/``...beft_scale_out``)."""
    return name.rsplit(".", 1)[-1] in SCALE_PARAMETERS.values()


def fold_scaling_vectors(model: nn.Module) -> int:
    """Multiply every attached scaling vector into its layer's weight and remove it (for merged checkpoints).

    ``W diag(s_in)`` and ``diag(s_out) W`` become the weight; the bias stays as it is (a ``scale_out``
    vector never scaled it). The layer's own forward comes back. Outputs equal the scaled model's up
    to float rounding (``(W * s) x`` is not rounded like ``W (s * x)``). Returns the layers folded.
    """
    folded = 0
    for module in model.modules():
        if not getattr(module, "_beft_scaled", False):
            continue
        in_dim = 1 if isinstance(module, nn.Linear) else 0
        with torch.no_grad():
            for side, name in SCALE_PARAMETERS.items():
                scale = module._parameters.pop(name, None)
                if scale is not None:
                    shape = [1, 1]
                    shape[in_dim if side == "in" else 1 - in_dim] = -1
                    module.weight.mul_(scale.to(module.weight.dtype).view(shape))
        del module.forward  # the instance attribute set by _attach: the class's forward again
        del module._beft_scaled
        folded += 1
    return folded


def supported_scaling_types(model: nn.Module) -> list[str]:
    """The scaling-vector types ``model`` has layers for (all but GPT-2's fused q/k/v, and MLPs some tables lack)."""
    return [t for t in SCALING_TYPES if _projection_modules(model, split_scaling_type(t)[0])]
