"""Export an adapter of scaling vectors as a peft IA3 adapter folder.

peft's IA3 keeps one vector per linear layer. A *feedforward* IA3 vector scales the layer's
input, ``W (s * x) + b``: exactly a ``*_scale_in`` vector (SSL). A non-feedforward one scales the
whole output, bias included, ``s * (W x + b)``, while a ``*_scale_out`` vector leaves the bias
unscaled, ``s * (W x) + b``: the two agree only on a layer without a bias, which the base model
must show. What IA3 cannot hold is refused, naming it: a layer with both vectors (SSB), an
output scaling on a layer with a bias, and bias deltas in the same adapter (peft holds one
tuner type per adapter: export biases with the BEFT tuner, scalings with IA3).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import PeftExportError
from ..vectors import SCALE_PARAMETERS, is_scaling_parameter
from .arithmetic import apply_delta
from .format import BeftAdapter

_SIDE_OF = {parameter: side for side, parameter in SCALE_PARAMETERS.items()}


def ia3_targets(adapter: BeftAdapter, base_model: nn.Module | None) -> dict[str, tuple[str, torch.Tensor]]:
    """Module name -> (``"in"`` or ``"out"``, the trained scaling vector), or ``PeftExportError`` saying why not."""
    biases = [name for name in adapter.deltas if not is_scaling_parameter(name)]
    if biases:
        raise PeftExportError(
            f"This adapter holds bias deltas ({biases[0]}, ...) and scaling vectors; a peft adapter holds one "
            "tuner type. Load it with beft_trainer.load_adapter(), or train one kind of vector."
        )
    targets: dict[str, tuple[str, torch.Tensor]] = {}
    for name, delta in adapter.deltas.items():
        module_name, parameter = name.rsplit(".", 1)
        if module_name in targets:
            raise PeftExportError(
                f"{module_name} has both an input and an output scaling (SSB); peft's IA3 keeps one vector "
                "per layer. Load it with beft_trainer.load_adapter()."
            )
        scale = apply_delta(torch.ones_like(delta), delta, fix=adapter.fixes.get(name))
        targets[module_name] = (_SIDE_OF[parameter], scale)
    for module_name, (side, _) in targets.items():
        if side == "out":
            _require_bias_free(module_name, base_model)
    return targets


def _require_bias_free(module_name: str, base_model: nn.Module | None) -> None:
    module = dict(base_model.named_modules()).get(module_name) if base_model is not None else None
    if module is None or getattr(module, "bias", None) is not None:
        raise PeftExportError(
            f"{module_name} has an output scaling; peft's IA3 scales the output with its bias, "
            "beft_trainer leaves the bias unscaled, so they agree only on a layer without a bias"
            + (" (pass base_model= to show it has none)." if module is None else ", and this one has a bias.")
        )


def write_ia3(
    peft: Any, head: dict[str, torch.Tensor], targets: dict[str, tuple[str, torch.Tensor]], out_dir: str, **config: Any
) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors``: IA3 vectors plus the saved modules' ``head``."""
    ia3 = peft.IA3Config(
        target_modules=sorted(targets),
        feedforward_modules=sorted(m for m, (side, _) in targets.items() if side == "in"),
        inference_mode=True,
        **config,
    )
    os.makedirs(out_dir, exist_ok=True)
    ia3.save_pretrained(out_dir)
    # peft's shapes: (1, in_features) for an input scaling, (out_features, 1) for an output one.
    tensors = {
        f"base_model.model.{module}.ia3_l": (scale.reshape(1, -1) if side == "in" else scale.reshape(-1, 1))
        .float()
        .contiguous()
        for module, (side, scale) in targets.items()
    }
    tensors |= {f"base_model.model.{name}": value.contiguous() for name, value in head.items()}
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
