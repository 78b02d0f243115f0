"""beft-trainer: bias-efficient fine-tuning (BitFit, BEFT) for the Hugging Face Trainer.

Module map (data flows one way: model -> biases -> groups -> probe -> scores -> switch -> report + adapter):

- ``config``: every option, declared once: ``SelectionConfig`` (the callback) and ``BeftConfig`` (the trainer).
- ``biases``: which parameters are a model's q/k/v/... biases, by exact per-architecture names.
- ``vectors``: scaling vectors (SSL/SSB) on linear layers; ``prepare_model`` gives a model the training layout.
- ``heads``: which parameters are the task head.
- ``groups``: the optimizer parameter groups (one per bias type, the head's two) and their names.
- ``checks``: checks of what the trainer is given, before any step.
- ``trainer``: ``BeftTrainer``: the groups, the exact switch, the adapter of the run.
- ``callback``: ``BiasSelectionCallback``: probe, score, decide, report.
- ``probe``: squared-gradient statistics gathered while probing (per vector and per token), saved per rank, merged on resume.
- ``scores``: importance scores as pure tensor functions; inert detection; the ranking.
- ``resume``: the settings each checkpoint records, and the check a resume must pass.
- ``distributed``: everything that knows about DDP and DeepSpeed ZeRO (full values, ranks, optimizer groups).
- ``precision``: frozen weights in half precision, every trained vector in fp32.
- ``report``, ``plot``: the selection report (``beft_selection.json``) and its figure.
- ``adapters/``: the adapter file format, checksum, base-model fingerprint, exact arithmetic, apply, peft export
  (BEFT tuner and IA3), mixed batches (one adapter per row), merged checkpoints.
- ``errors``: every error class, and ``one_line`` (a message as one line).
- ``cli``, ``cli_inspect``, ``cli_merge``, ``cli_plan``: the ``beft`` command (report, inspect, export-peft, merge,
  plan).
- ``plan``: the memory model behind ``beft plan`` (a model's shape from its config, estimates per backend).
- ``recipes_support/``: tasks, data checks, methods and argument parsing for ``recipes/`` (not imported here).
"""

from .adapters import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    AdapterSet,
    BeftAdapter,
    MixedAdapters,
    base_model_fingerprint,
    build_adapter,
    check_adapter,
    export_peft,
    load_adapter,
    load_mixed_adapters,
    merge_adapter,
    read_adapter,
    save_merged,
)
from .biases import (
    ALL_BIASES,
    BIAS_TYPES,
    SCALING_TYPES,
    VECTOR_TYPES,
    BiasLayout,
    add_missing_biases,
    find_biases,
    split_fused_qkv_bias,
)
from .callback import BiasSelectionCallback
from .config import BeftConfig, SelectionConfig
from .errors import AdapterError, BeftConfigError, BiasTypeError, PeftExportError, ReportError, ResumeError
from .heads import find_head_parameters
from .plot import plot_report, report_figure
from .report import REPORT_NAME, SelectionReport, read_report, write_report
from .scores import (
    SCORE_NAMES,
    attribution_score,
    find_inert,
    fisher_score,
    magnitude_score,
    movement_score,
    projection_score,
    random_score,
)
from .trainer import BeftTrainer

__version__ = "0.1.0"

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "ALL_BIASES",
    "BIAS_TYPES",
    "REPORT_NAME",
    "SCALING_TYPES",
    "SCORE_NAMES",
    "VECTOR_TYPES",
    "AdapterError",
    "AdapterSet",
    "BeftAdapter",
    "BeftConfig",
    "BeftConfigError",
    "BeftTrainer",
    "BiasLayout",
    "BiasSelectionCallback",
    "BiasTypeError",
    "MixedAdapters",
    "PeftExportError",
    "ReportError",
    "ResumeError",
    "SelectionConfig",
    "SelectionReport",
    "__version__",
    "add_missing_biases",
    "attribution_score",
    "base_model_fingerprint",
    "build_adapter",
    "check_adapter",
    "export_peft",
    "find_biases",
    "find_head_parameters",
    "find_inert",
    "fisher_score",
    "load_adapter",
    "load_mixed_adapters",
    "magnitude_score",
    "merge_adapter",
    "movement_score",
    "plot_report",
    "projection_score",
    "random_score",
    "read_adapter",
    "read_report",
    "report_figure",
    "save_merged",
    "split_fused_qkv_bias",
    "write_report",
]
