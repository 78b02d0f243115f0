"""Checks of what ``BeftTrainer`` is given, run before any step: each failure is one clear line."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from .callback import BiasSelectionCallback
from .errors import BeftConfigError
from .resume import RUN_SETTINGS_NAME

#: Optimizers that ignore a parameter group's lr, so an lr of 0 would not freeze anything.
_LR_IGNORING_OPTIMIZERS = ("lomo", "adalomo", "schedule_free", "galore", "apollo")
#: Files that mark a folder as written by an earlier run (which a new run may overwrite); the recipes' full and peft
#: methods write only eval_results.json.
_RUN_MARKERS = (RUN_SETTINGS_NAME, "beft_selection.json", "beft_adapter.json", "eval_results.json")


def check_model(model: nn.Module | None) -> None:
    """Refuse a missing model, a model already wrapped by peft, and one that holds beft adapters."""
    if model is None:
        raise BeftConfigError("BeftTrainer needs a model (model_init is not supported).")
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        raise BeftConfigError(
            f"The model is already wrapped by peft ({type(model).__name__}): BeftTrainer would train its "
            "adapter and biases together. Pass the plain transformers model, or merge the peft adapter "
            "first (model.merge_and_unload())."
        )
    if getattr(model, "beft_adapters", None) is not None or getattr(model, "beft_mixed_adapters", None):
        raise BeftConfigError(
            "The model holds beft adapters (load_adapter or load_mixed_adapters): training would move the parameters "
            "they restore on switching, and the new adapter would fit only base + those adapters. Train from the base "
            "model, or make base + adapter a new base first (save_merged, then load the saved folder)."
        )


def check_no_optimizer_given(optimizers: tuple) -> None:
    """Refuse ``Trainer(optimizers=(optimizer, scheduler))``: it would bypass the per-type groups."""
    if tuple(optimizers or (None, None)) != (None, None):
        raise BeftConfigError(
            "BeftTrainer builds its own optimizer (one parameter group per bias type, so the switch "
            "can freeze exactly): drop optimizers=..., choose one with TrainingArguments(optim=...) "
            "or optimizer_cls_and_kwargs=(cls, kwargs)."
        )


def check_optimizer(args: Any, deepspeed_plugin: Any | None) -> None:
    """Refuse optimizers that ignore a group's learning rate, and DeepSpeed ``optimizer``/``scheduler`` sections."""
    optim = getattr(args.optim, "value", str(args.optim))
    if optim.startswith(_LR_IGNORING_OPTIMIZERS):
        raise BeftConfigError(
            f"optim={args.optim!r} ignores per-group learning rates, so frozen bias types "
            "would keep moving or it builds its own groups. Use AdamW (the default), SGD, Adafactor, RMSprop or Lion."
        )
    sections = deepspeed_plugin.hf_ds_config.config if deepspeed_plugin is not None else {}
    if "optimizer" in sections:
        raise BeftConfigError(
            "The DeepSpeed config has an 'optimizer' section, which replaces the Trainer's "
            "per-bias-type parameter groups. Remove it (ds_configs/*.json show how): the "
            "Trainer's AdamW then runs inside ZeRO."
        )
    if "scheduler" in sections:
        raise BeftConfigError(
            "The DeepSpeed config has a 'scheduler' section, whose schedule sets every group's learning rate from "
            "its own values, so frozen bias types would train again. Remove it (ds_configs/*.json show how): the "
            "Trainer's lr_scheduler_type and warmup then run inside ZeRO."
        )


def check_output_dir(output_dir: str) -> None:
    """Refuse to start a new run in a folder that holds files no beft-trainer run wrote.

    An empty or missing folder, or the folder of an earlier run (it holds ``beft_run.json``, a
    selection report, an adapter or ``checkpoint-N`` folders), is fine: the new run replaces
    its own kind of files.
    """
    if not os.path.isdir(output_dir):
        return
    entries = os.listdir(output_dir)
    earlier_run = any(name in _RUN_MARKERS or name.startswith("checkpoint-") for name in entries)
    if entries and not earlier_run:
        shown = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
        raise BeftConfigError(
            f"output_dir={output_dir!r} already holds files that no beft-trainer run wrote ({shown}); "
            "training would write its checkpoints, report and adapter among them. Choose an empty or new folder."
        )


def find_selection_callback(callbacks: list | None, beft_config: Any) -> BiasSelectionCallback | None:
    """The one ``BiasSelectionCallback`` instance among ``callbacks`` (None without); refused beside fixed types."""
    if any(isinstance(cb, type) and issubclass(cb, BiasSelectionCallback) for cb in callbacks or []):
        raise BeftConfigError(
            "callbacks holds the BiasSelectionCallback class; pass an instance: "
            "callbacks=[BiasSelectionCallback(probe_steps=50)]."
        )
    found = [cb for cb in callbacks or [] if isinstance(cb, BiasSelectionCallback)]
    if len(found) > 1:
        raise BeftConfigError("Pass at most one BiasSelectionCallback.")
    if found and beft_config.bias_types is not None:
        raise BeftConfigError(
            "BeftConfig.bias_types fixes the trained types, BiasSelectionCallback selects them: "
            "use one or the other (the callback's `candidates` say what is probed)."
        )
    return found[0] if found else None
