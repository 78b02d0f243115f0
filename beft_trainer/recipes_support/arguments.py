"""The recipes' command line: their dataclasses, parsing (flags or a .json/.yaml file), and one-line usage errors.

Every option is declared once: ``SelectionConfig`` and ``BeftConfig`` (the library's) are parsed
as they are, next to the recipe's own dataclasses. A wrong option or wrong data ends the recipe
with one line on stderr and exit status 2, before the model loads and before anything is written.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NoReturn, TypeVar

from transformers import HfArgumentParser, TrainingArguments

from ..config import BeftConfig, SelectionConfig
from ..errors import BeftConfigError, DataInputError, one_line
from .command_line import check_output_folder, check_single_candidate, describe_recipe_flags, given_options
from .data import check_data_sources
from .methods import MethodArguments, configure_method

#: Exit status of a usage error (bad option or bad data), as argparse uses.
USAGE_ERROR_STATUS = 2

_CONFIG_EXTENSIONS = (".json", ".yaml", ".yml")

Result = TypeVar("Result")


@dataclass
class RecipeTrainingArguments(TrainingArguments):
    """``TrainingArguments`` whose learning rate defaults per method and that measure the untuned model."""

    learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Peak learning rate. Default: per method (bias types 1e-2, BitFit 3e-3, LoRA 1e-3, full 5e-5)."
        },
    )
    #: Which default learning-rate table applies (``methods.LEARNING_RATES_BY_MODEL_KIND``).
    model_kind: ClassVar[str] = "encoder"

    eval_on_start: bool = field(
        default=True,
        metadata={"help": "Evaluate before the first step: the untuned baseline (pretrained backbone, initial head)."},
    )

    def __post_init__(self) -> None:
        # Each would fail deep inside training with a traceback, or train nothing and report a "tuned" result.
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise BeftConfigError(f"--learning_rate must be > 0, got {self.learning_rate}.")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise BeftConfigError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if self.max_steps <= 0 and not self.num_train_epochs > 0:
            raise BeftConfigError(
                f"--num_train_epochs {self.num_train_epochs:g} without --max_steps trains nothing: "
                "give --num_train_epochs > 0 or --max_steps >= 1."
            )
        super().__post_init__()


@dataclass
class DataArguments:
    """Which task and data, and how much of it (a recipe subclasses it to change defaults and help)."""

    task_name: str = field(default="sst2", metadata={"help": "Task name."})
    train_file: str | None = field(default=None, metadata={"help": "Local training file (.jsonl/.json/.csv/.tsv)."})
    validation_file: str | None = field(default=None, metadata={"help": "Local validation file (same columns)."})
    data_dir: str | None = field(
        default=None,
        metadata={"help": "Folder with <task>/{train,validation}.jsonl (e.g. ../shared/data/glue). Default: the Hub."},
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={"help": "Low-data regime: train on this many examples sampled with --data_seed/--seed."},
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on at most this many examples."})
    max_seq_length: int = field(default=128, metadata={"help": "Truncate inputs to this many tokens."})

    def __post_init__(self) -> None:
        for name in ("max_train_samples", "max_eval_samples", "max_seq_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                unset = " (or leave it unset for every example)" if name != "max_seq_length" else ""
                raise DataInputError(f"--{name} must be >= 1{unset}, got {value}.")
        check_data_sources(self.train_file, self.validation_file, self.data_dir)


class RecipeArgumentParser(HfArgumentParser):
    """``HfArgumentParser`` whose errors are ``BeftConfigError`` (one line, exit 2) instead of usage + message."""

    def error(self, message: str) -> NoReturn:
        raise BeftConfigError(message)


def read_config_file(path: str) -> dict[str, Any]:
    """The options in a .json or .yaml file: a mapping of option names to values."""
    import yaml

    try:
        with open(path) as f:
            values = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    except (OSError, ValueError, yaml.YAMLError) as error:  # missing file, bad JSON (a ValueError), bad YAML
        reason = f"{type(error).__name__}: {one_line(error)}"
        raise BeftConfigError(f"{path}: cannot read the options file ({reason}).") from error
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise BeftConfigError(
            f"{path}: holds a {type(values).__name__}, not options; write one 'name: value' per line "
            "(YAML) or an object (JSON)."
        )
    return values


def parse_recipe_args(dataclass_types: Sequence[type], argv: Sequence[str] | None = None) -> tuple:
    """Parse the recipe's dataclasses from the command line, or from a .json/.yaml file given first.

    Arguments after the file override it (launchers append ``--local_rank``, users may add others).
    With ``MethodArguments``, ``SelectionConfig`` and ``BeftConfig`` among them, ``--method`` sets
    what trains (``configure_method``) and the learning rate defaults per method.
    """
    parser = RecipeArgumentParser(tuple(dataclass_types))
    describe_recipe_flags(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    from_file: dict[str, Any] = {}
    if argv and argv[0].endswith(_CONFIG_EXTENSIONS) and not argv[0].startswith("-"):
        from_file = read_config_file(argv.pop(0))
        unknown = sorted(set(from_file) - {action.dest for action in parser._actions})
        if unknown:
            raise BeftConfigError(f"Unknown keys in the config file: {unknown}.")
        parser.set_defaults(**from_file)
    from_argv = given_options(parser, argv)
    check_single_candidate(from_argv if "candidates" in from_argv else from_file)
    try:
        parsed = parser.parse_args_into_dataclasses(args=argv)
    except BeftConfigError:
        raise
    except ValueError as error:  # unused arguments, TrainingArguments' own checks: all about the options given
        raise BeftConfigError(str(error)) from error
    parsed = _apply_method(tuple(parsed), set(from_file) | set(from_argv))
    for item in parsed:
        if isinstance(item, TrainingArguments):
            check_output_folder(item.output_dir, item.resume_from_checkpoint)
    return parsed


def _apply_method(parsed: tuple[Any, ...], given: set[str]) -> tuple[Any, ...]:
    by_type = {type(item): item for item in parsed}
    method_args = next((item for item in parsed if isinstance(item, MethodArguments)), None)
    if method_args is None:
        return parsed
    if SelectionConfig in by_type and BeftConfig in by_type:
        beft = configure_method(method_args, by_type[SelectionConfig], by_type[BeftConfig], given)
        parsed = tuple(beft if isinstance(item, BeftConfig) else item for item in parsed)
    for item in parsed:
        if isinstance(item, RecipeTrainingArguments) and item.learning_rate is None:
            item.learning_rate = method_args.parsed.learning_rate_for(item.model_kind)
    return parsed


def check_probe_fits(selection: SelectionConfig, method_args: MethodArguments, args: TrainingArguments) -> None:
    """With a fixed ``--max_steps``, refuse a probe that leaves no training, before the model loads."""
    if method_args.parsed.kind == "beft" and 0 < args.max_steps <= selection.probe_step_count(args.max_steps):
        raise BeftConfigError(
            f"--probe_steps {selection.describe_probe_steps(args.max_steps)} leaves no "
            f"training after the switch with --max_steps "
            f"{args.max_steps}: lower --probe_steps or raise --max_steps."
        )


def exit_on_usage_error(main: Callable[..., Result]) -> Callable[..., Result]:
    """Decorate a recipe's ``main``: a ``BeftConfigError`` (bad option, bad data) becomes one line and exit 2."""
    program = Path(inspect.getfile(main)).name

    @functools.wraps(main)
    def run(*args: Any, **kwargs: Any) -> Result:
        try:
            return main(*args, **kwargs)
        except BeftConfigError as error:
            print(f"{program}: error: {one_line(error)}", file=sys.stderr)
            raise SystemExit(USAGE_ERROR_STATUS) from None

    return run
