"""What a recipe reports after training: metrics before and after, trainable parameters, the adapter, a summary."""

from __future__ import annotations

import json
import os
from typing import Any

from transformers import Trainer, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME

from ..adapters import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from ..biases import BIAS_TYPES
from ..distributed import full_numel
from ..errors import ResumeError
from ..report import PLOT_NAME, REPORT_NAME, SelectionReport
from ..trainer import BeftTrainer
from .methods import MethodArguments

#: The recipes' results file in ``output_dir``.
RESULTS_NAME = "eval_results.json"
#: Every file a recipe run writes to ``output_dir`` (besides checkpoints).
RUN_FILES = (RESULTS_NAME, REPORT_NAME, PLOT_NAME, ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)


def untuned_metrics(trainer: Trainer) -> dict[str, float]:
    """The metrics of the evaluation run before the first step (``eval_on_start``), or ``{}``.

    Call it before the final ``evaluate()``: a run that trains no step logs that one at step 0 too.
    ``eval_on_start`` logs first, so only a first entry counts (a resumed run keeps its checkpoint's).
    """
    history = trainer.state.log_history
    first = history[0] if history else {}
    if first.get("step") == 0 and any(key.startswith("eval_") for key in first):
        return {k: v for k, v in first.items() if k.startswith("eval_")}
    return {}


def resume_checkpoint(args: TrainingArguments) -> str | None:
    """``--resume_from_checkpoint``, checked before the model loads: an existing checkpoint folder, or None."""
    checkpoint = args.resume_from_checkpoint
    if checkpoint is None:
        return None
    if not os.path.isdir(checkpoint):
        raise ResumeError(f"--resume_from_checkpoint {checkpoint}: no such folder; pass a checkpoint-N folder.")
    if not os.path.isfile(os.path.join(checkpoint, TRAINER_STATE_NAME)):
        raise ResumeError(
            f"--resume_from_checkpoint {checkpoint}: not a checkpoint (no {TRAINER_STATE_NAME}); "
            "pass a checkpoint-N folder of an earlier run."
        )
    return checkpoint


def train_or_resume(trainer: Trainer, checkpoint: str | None) -> None:
    """``trainer.train()``, from ``checkpoint`` if given; a new run first removes an earlier run's outputs."""
    if checkpoint is None:
        clear_earlier_outputs(trainer)
    else:
        # The untuned baseline is in the checkpoint's log history; evaluating now would measure a trained model.
        trainer.args.eval_on_start = False
    trainer.train(resume_from_checkpoint=checkpoint)


def clear_earlier_outputs(trainer: Trainer) -> None:
    """Remove what an earlier run left in ``output_dir`` (results, selection report, adapter): not this run's."""
    if trainer.is_world_process_zero():
        for name in RUN_FILES:
            path = os.path.join(trainer.args.output_dir, name)
            if os.path.isfile(path):
                os.remove(path)


def selection_report(trainer: Trainer) -> SelectionReport | None:
    """The report of the run's ``BiasSelectionCallback`` (the content of ``beft_selection.json``), if any."""
    selection = trainer.selection_callback if isinstance(trainer, BeftTrainer) else None
    return selection.report if selection is not None else None


def count_trainable(model) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts of a model (ZeRO-3 partitions counted in full)."""
    trainable = total = 0
    for param in model.parameters():
        numel = full_numel(param)
        total += numel
        trainable += numel if param.requires_grad else 0
    return trainable, total


def trainable_parameter_counts(trainer: Trainer) -> dict[str, int | float]:
    """``{"trainable", "total", "share"}`` of the run's final trainable set."""
    if isinstance(trainer, BeftTrainer):
        trainable, total = trainer.count_parameters(), trainer.total_parameters()
    else:
        trainable, total = count_trainable(trainer.model)
    return {"trainable": trainable, "total": total, "share": trainable / total if total else 0.0}


def collect_results(trainer: Trainer, method_args: MethodArguments, **extra) -> dict:
    """Everything a run reports: method, untuned and final metrics, trainable parameters, selection."""
    report = selection_report(trainer)
    untuned = untuned_metrics(trainer)  # before evaluate(), which logs too
    return {
        **extra,
        "method": str(method_args.parsed),
        "untuned": untuned,
        "final": trainer.evaluate(),
        "trainable_parameters": trainable_parameter_counts(trainer),
        "selected": list(report.selected) if report else None,
    }


def save_task_adapter(trainer: Trainer) -> dict[str, Any] | None:
    """Save the BEFT adapter (bias deltas + head) of a bias method to ``output_dir``; None otherwise.

    Every process calls it (reading ZeRO-3 partitions is collective); only the main one writes.
    """
    if not isinstance(trainer, BeftTrainer):
        return None
    metadata = trainer.save_adapter()
    return {"path": trainer.args.output_dir, "bytes": metadata.file_size, "parameters": metadata.parameter_count}


def finish_run(trainer: Trainer, method_args: MethodArguments, main_metric: str, **extra: Any) -> dict[str, Any]:
    """After ``trainer.train()``: evaluate, save the adapter, write ``eval_results.json``, print the summary.

    Every process calls it; ``extra`` (task, model, ...) goes into the results as is.
    """
    results = collect_results(trainer, method_args, resumed_from=trainer.args.resume_from_checkpoint, **extra)
    results["adapter"] = save_task_adapter(trainer)
    write_results(trainer, results)
    print_summary(trainer, results, main_metric)
    return results


def write_results(trainer: Trainer, results: dict[str, Any]) -> None:
    """Write ``eval_results.json`` to ``output_dir`` (main process; the selection callback plots its own report)."""
    if trainer.is_world_process_zero():
        os.makedirs(trainer.args.output_dir, exist_ok=True)
        with open(os.path.join(trainer.args.output_dir, RESULTS_NAME), "w") as f:
            json.dump(results, f, indent=2)


def summary_lines(results: dict[str, Any], metric: str) -> list[str]:
    """Human summary: selected type, trainable share, untuned vs tuned main metric."""
    counts = results["trainable_parameters"]
    lines = [f"method: {results['method']}"]
    if results.get("selected"):
        selected = results["selected"]
        label = "selected bias type" if len(selected) == 1 and selected[0] in BIAS_TYPES else "selected vector types"
        lines.append(f"{label}: {'+'.join(selected)}")
    lines.append(
        f"trainable parameters: {counts['trainable']:,} of {counts['total']:,} ({100 * counts['share']:.4f}%)"
    )
    if results.get("adapter"):
        adapter = results["adapter"]
        lines.append(
            f"adapter: {adapter['bytes'] / 1024:.1f} KB ({adapter['parameters']:,} values), "
            "apply with beft_trainer.load_adapter(base_model, output_dir)"
        )
    key = f"eval_{metric}"
    before = results["untuned"].get(key)
    after = results["final"].get(key)
    untuned = f"untuned {before:.4f}" if before is not None else "untuned not evaluated (--eval_on_start false)"
    if after is not None:
        lines.append(f"validation {metric}: {untuned} -> tuned {after:.4f}")
    return lines


def print_summary(trainer: Trainer, results: dict[str, Any], metric: str) -> None:
    """Print the summary on the main process."""
    if trainer.is_world_process_zero():
        # Only what this run wrote: other files in the folder are not its results.
        written = [RESULTS_NAME, ADAPTER_CONFIG_NAME] if results.get("adapter") else [RESULTS_NAME]
        if results.get("selected") is not None:
            written += [REPORT_NAME, PLOT_NAME]
        files = sorted(f for f in written if os.path.isfile(os.path.join(trainer.args.output_dir, f)))
        output = f"output: {trainer.args.output_dir} ({', '.join(files)})"
        print("\n".join(["", "=" * 60, *summary_lines(results, metric), output, "=" * 60]))
