"""What both recipes share: argument parsing (CLI or a .json/.yaml file), defaults, and the results files."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import HfArgumentParser, Trainer, TrainingArguments

from .errors import BeftConfigError
from .methods import MethodArguments, trainable_parameter_counts
from .report import REPORT_NAME
from .trainer import BeftTrainer

logger = logging.getLogger(__name__)

#: The recipes' results file in ``output_dir``.
RESULTS_NAME = "eval_results.json"

_CONFIG_EXTENSIONS = (".json", ".yaml", ".yml")


@dataclass
class RecipeTrainingArguments(TrainingArguments):
    """``TrainingArguments`` whose learning rate defaults per method and that measure the untuned model."""

    learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Peak learning rate. Default: per method (bias types 1e-2, BitFit 3e-3, LoRA 1e-3, full 5e-5)."
        },
    )
    eval_on_start: bool = field(
        default=True,
        metadata={"help": "Evaluate before the first step: the untuned baseline (pretrained backbone, initial head)."},
    )


def _read_config_file(path: str) -> dict[str, Any]:
    with open(path) as f:
        if path.endswith(".json"):
            return json.load(f)
        import yaml

        return yaml.safe_load(f) or {}


def parse_recipe_args(dataclass_types: Sequence[type], argv: Sequence[str] | None = None) -> tuple:
    """Parse the recipe's dataclasses from the command line, or from a .json/.yaml file given first.

    Arguments after the file override it (launchers append ``--local_rank``, users may add others).
    """
    parser = HfArgumentParser(tuple(dataclass_types))
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith(_CONFIG_EXTENSIONS) and not argv[0].startswith("-"):
        values = _read_config_file(argv.pop(0))
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise BeftConfigError(f"Unknown keys in the config file: {unknown}.")
        parser.set_defaults(**values)
    parsed = parser.parse_args_into_dataclasses(args=argv)
    for item in parsed:
        if isinstance(item, RecipeTrainingArguments) and item.learning_rate is None:
            methods = [p for p in parsed if isinstance(p, MethodArguments)]
            item.learning_rate = methods[0].parsed.default_learning_rate if methods else 5e-5
    return parsed


def start_processes(args: TrainingArguments) -> None:
    """Set up the device and, under a launcher, the process group, before the model loads.

    Under ZeRO-3 ``from_pretrained`` partitions the weights as it loads them; DeepSpeed reads the
    world size from its process group then (``deepspeed.comm``) and would see 1 process if it did not exist.
    """
    logger.info("Process %d of %d on %s", args.process_index, args.world_size, args.device)
    if args.deepspeed and args.world_size > 1:
        import deepspeed.comm
        import torch.distributed

        if not deepspeed.comm.is_initialized() and torch.distributed.is_initialized():
            # On CPU the Trainer starts a plain torch.distributed group; ZeRO-3's loading asks deepspeed.comm.
            deepspeed.comm.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)


def untuned_metrics(trainer: Trainer) -> dict[str, float]:
    """The metrics of the evaluation run before the first step (``eval_on_start``), or ``{}``."""
    for entry in trainer.state.log_history:
        if entry.get("step") == 0 and any(key.startswith("eval_") for key in entry):
            return {k: v for k, v in entry.items() if k.startswith("eval_")}
    return {}


def selection_report(output_dir: str) -> dict[str, Any] | None:
    """The BEFT selection report the callback wrote, if any."""
    path = os.path.join(output_dir, REPORT_NAME)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def collect_results(trainer: Trainer, method_args: MethodArguments, final_metrics: dict[str, float], **extra) -> dict:
    """Everything a run reports: method, untuned and final metrics, trainable parameters, selection."""
    report = selection_report(trainer.args.output_dir)
    return {
        **extra,
        "method": str(method_args.parsed),
        "untuned": untuned_metrics(trainer),
        "final": final_metrics,
        "trainable_parameters": trainable_parameter_counts(trainer),
        "selected": report["selected"] if report else None,
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
    results = collect_results(trainer, method_args, trainer.evaluate(), **extra)
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
        lines.append(f"selected bias type: {'+'.join(results['selected'])}")
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
    untuned = f"untuned {before:.4f} -> " if before is not None else ""
    if after is not None:
        lines.append(f"validation {metric}: {untuned}tuned {after:.4f}")
    return lines


def print_summary(trainer: Trainer, results: dict[str, Any], metric: str) -> None:
    """Print the summary on the main process."""
    if trainer.is_world_process_zero():
        files = sorted(f for f in os.listdir(trainer.args.output_dir) if f.endswith((".json", ".png")))
        output = f"output: {trainer.args.output_dir} ({', '.join(files)})"
        print("\n".join(["", "=" * 60, *summary_lines(results, metric), output, "=" * 60]))
