"""Merging an adapter into its base model: a plain transformers checkpoint any engine can serve.

The biases are added exactly as ``load_adapter`` adds them and the head is copied, so the merged
checkpoint, loaded with ``from_pretrained``, gives the adapter-applied model's outputs bit for bit.
Scaling vectors are multiplied into their layers' weights (``fold_scaling_vectors``): equal up to
float rounding, since ``(W * s) x`` rounds differently from ``W (s * x)``.
GPT-2's split q/k/v bias is fused back into ``c_attn.bias`` by the state-dict hook
``split_fused_qkv_bias`` installs, so the checkpoint has the layout every GPT-2 loader expects.
"""

from __future__ import annotations

import os

from torch import nn

from ..errors import AdapterError
from ..vectors import fold_scaling_vectors
from .apply import AdapterSet, load_adapter
from .format import ADAPTER_TYPES, PATH_TYPES, BeftAdapter, read_adapter, require_argument_types
from .peft import check_out_dir

__all__ = ["merge_adapter", "save_merged"]


def merge_adapter(model: nn.Module, adapter: BeftAdapter | str | os.PathLike) -> nn.Module:
    """Fold ``adapter`` into its freshly loaded base ``model`` (in place) and return the model.

    Checked like ``load_adapter`` (any other base model is refused). The result is a plain model:
    no adapter set is kept on it, and ``save_pretrained`` writes the merged weights. A model holding
    adapters from ``load_adapter``, or serving mixed batches, is refused.
    """
    require_argument_types(
        "merge_adapter(model, adapter)",
        "the base model (a torch.nn.Module), then a BeftAdapter or its folder",
        (model, nn.Module),
        (adapter, ADAPTER_TYPES),
    )
    if not isinstance(adapter, BeftAdapter):
        adapter = read_adapter(adapter)
    loaded = getattr(model, "beft_adapters", None)
    if isinstance(loaded, AdapterSet) and loaded.adapters:
        # The merged model keeps no adapter set, so these adapters would be dropped (the active one with them).
        raise AdapterError(
            f"merge_adapter folds an adapter into a bare base model, but this model holds adapters from load_adapter "
            f"({', '.join(loaded.adapters)}): merge into a freshly loaded base model, or remove them first "
            "(model.beft_adapters.remove(name))."
        )
    if adapter.metadata.added_biases:
        raise AdapterError(
            f"This adapter added q/k/v biases to a bias-free {adapter.metadata.model_type!r} model, which its "
            "transformers checkpoint has no place for: serve it with load_adapter or mixed batches instead."
        )
    load_adapter(model, adapter)
    object.__delattr__(model, "beft_adapters")  # merged: nothing left to switch
    fold_scaling_vectors(model)
    return model


def save_merged(
    adapter: BeftAdapter | str | os.PathLike,
    model: nn.Module,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
) -> str:
    """Merge ``adapter`` into its base ``model`` and ``save_pretrained`` it (safetensors) to ``out_dir``.

    ``out_dir`` must be new or empty unless ``overwrite`` (checked before anything is loaded or
    written, by the same check as ``export_peft``); a folder holding a peft adapter is refused even
    then, since ``from_pretrained`` would apply it on top of the merged weights. Returns the folder.
    """
    require_argument_types(
        "save_merged(adapter, model, out_dir)",
        "a BeftAdapter or its folder, then the base model (a torch.nn.Module), then the folder to write",
        (adapter, ADAPTER_TYPES),
        (model, nn.Module),
        (out_dir, PATH_TYPES),
    )
    out_dir = os.fspath(out_dir)
    check_out_dir(out_dir, overwrite, writing="model")
    merge_adapter(model, adapter)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
