"""What a checkpoint records about the run that made it, and the check a resume must pass.

A resume continues the optimizer, the scheduler and the selection state of the checkpoint; they
only fit a run with the same parameter groups and the same selection settings. Each checkpoint
holds ``beft_run.json`` with those settings, and a resume that contradicts one is refused before
any step, naming the setting.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from transformers.trainer_utils import get_last_checkpoint

from .config import BeftConfig, SelectionConfig
from .errors import ResumeError

logger = logging.getLogger(__name__)

#: File name of the run's settings inside each checkpoint folder.
RUN_SETTINGS_NAME = "beft_run.json"
#: What the Trainer writes into every checkpoint it can resume from (transformers' TRAINER_STATE_NAME and
#: SCHEDULER_NAME; the scheduler is the Trainer's own, since DeepSpeed's is refused).
_TRAINER_STATE = "trainer_state.json"
_SCHEDULER_STATE = "scheduler.pt"


def run_settings(
    group_names: list[str],
    beft_config: BeftConfig,
    selection: SelectionConfig | None,
    head: list[str],
    base_fingerprint: str,
) -> dict[str, Any]:
    """The settings a checkpoint records: the base model's fingerprint, the parameter groups, the head's
    parameter names, ``BeftConfig`` and the selection options."""
    bias_types = beft_config.bias_types
    return {
        # The resumed Trainer loads the checkpoint's weights, but the adapter's deltas, its recorded base and
        # the rewind all read the model this run was given: they only agree on the same base model.
        "base_model_fingerprint": base_fingerprint,
        "parameter_groups": list(group_names),
        "head_parameters": sorted(head),
        "beft_config": {
            "bias_types": bias_types if isinstance(bias_types, str) else list(bias_types or []),
            "head_modules": list(beft_config.head_modules) if beft_config.head_modules is not None else None,
            "train_head": beft_config.train_head,
            "frozen_dtype": beft_config.frozen_dtype,
            "add_missing_biases": beft_config.add_missing_biases,
        },
        "selection": selection.shaping_settings() if selection is not None else None,
    }


def write_run_settings(folder: str, settings: dict[str, Any]) -> None:
    """Write ``settings`` to ``folder/beft_run.json`` (call it on the main process only)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, RUN_SETTINGS_NAME), "w") as f:
        json.dump(settings, f, indent=2)


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resume(checkpoint: str, settings: dict[str, Any]) -> None:
    """Raise ``ResumeError`` unless ``checkpoint`` was made by a run with these ``settings``.

    A checkpoint without the settings file (written by an older beft-trainer) is accepted with
    a warning: nothing can be compared.
    """
    if not os.path.isdir(checkpoint):
        raise ResumeError(f"resume_from_checkpoint={checkpoint!r} is not a folder; pass a checkpoint-N folder.")
    _check_training_state(checkpoint)
    path = os.path.join(checkpoint, RUN_SETTINGS_NAME)
    if not os.path.isfile(path):
        logger.warning("%s has no %s: cannot check that this run's settings match it.", checkpoint, RUN_SETTINGS_NAME)
        return
    try:
        with open(path) as f:
            recorded = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ResumeError(f"{path} cannot be read ({error}); resume from another checkpoint.") from error
    if not isinstance(recorded, dict):
        raise ResumeError(f"{path} is not a settings object; resume from another checkpoint.")
    before, now = _flatten(recorded), _flatten(settings)
    unrecorded = sorted(now.keys() - before.keys())
    if unrecorded:
        logger.warning("%s (an older beft-trainer) does not record %s: not compared.", path, ", ".join(unrecorded))
    changed = [key for key in sorted(before.keys()) if before.get(key) != now.get(key)]
    if changed == ["base_model_fingerprint"]:  # it also moves with the head, which the fingerprint leaves out
        raise ResumeError(
            f"Cannot resume from {checkpoint}: it was trained from another base model (fingerprint "
            f"{str(before['base_model_fingerprint'])[:12]}..., this model {now['base_model_fingerprint'][:12]}...). "
            "Load the exact model the run started from, in the same dtype."
        )
    changed = [key for key in changed if key != "base_model_fingerprint"]
    if changed:
        details = "; ".join(f"{key}: checkpoint {before.get(key)!r}, this run {now.get(key)!r}" for key in changed)
        raise ResumeError(
            f"Cannot resume from {checkpoint}: this run's settings differ from the checkpoint's ({details}). "
            "Resume with the checkpoint's settings, or start a new run in another output_dir."
        )


def _check_training_state(checkpoint: str) -> None:
    """Refuse a folder the Trainer would not continue exactly: no step count, or no optimizer and scheduler."""
    if not os.path.isfile(os.path.join(checkpoint, _TRAINER_STATE)):
        raise ResumeError(
            f"{checkpoint} is not a checkpoint (no {_TRAINER_STATE}): the Trainer would restart at step 0 "
            "and probe again. Pass an OUTPUT_DIR/checkpoint-N folder."
        )
    if not os.path.isfile(os.path.join(checkpoint, _SCHEDULER_STATE)):
        raise ResumeError(
            f"{checkpoint} holds no optimizer or scheduler state (saved with save_only_model=True): a resume would "
            "restart the learning-rate schedule and the optimizer's moments, not continue the run. Resume from a "
            "checkpoint saved without save_only_model, or start a new run from its weights."
        )


def resolve_checkpoint(resume_from_checkpoint: str | os.PathLike | bool | None, output_dir: str) -> str | None:
    """The checkpoint folder ``Trainer.train(resume_from_checkpoint=...)`` resumes from, or None for a new run."""
    if resume_from_checkpoint is True:
        resume_from_checkpoint = get_last_checkpoint(output_dir)
        if resume_from_checkpoint is None:
            raise ResumeError(
                f"resume_from_checkpoint=True, but {output_dir} holds no checkpoint-N folder. "
                "Pass the checkpoint's path, or start without resume_from_checkpoint."
            )
    return os.fspath(resume_from_checkpoint) if resume_from_checkpoint else None


def forget_best_before(state: Any, switch_step: int | None) -> None:
    """Drop a best checkpoint taken while probing (``switch_step`` None: still probing) from a Trainer state.

    With load_best_model_at_end a probing checkpoint would bring back every candidate type trained,
    while the report says one. BeftTrainer never counts a probing evaluation; a resumed state may
    (an older beft-trainer's).
    """
    best = state.best_global_step
    if best and (switch_step is None or best < switch_step):
        state.best_metric = None
        state.best_global_step = None
        state.best_model_checkpoint = None
