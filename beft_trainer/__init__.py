"""beft-trainer: bias-efficient fine-tuning (BitFit, BEFT) for the Hugging Face Trainer."""

from .adapters import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    AdapterSet,
    BeftAdapter,
    base_model_fingerprint,
    build_adapter,
    check_adapter,
    export_peft,
    load_adapter,
    read_adapter,
)
from .biases import ALL_BIASES, BIAS_TYPES, BiasLayout, add_missing_biases, find_biases, split_fused_qkv_bias
from .callback import BiasSelectionCallback
from .config import BeftConfig, SelectionConfig
from .errors import AdapterError, BeftConfigError, BiasTypeError, PeftExportError
from .heads import find_head_parameters
from .plot import plot_report, report_figure
from .report import REPORT_NAME, SelectionReport, read_report, write_report
from .scores import SCORE_NAMES, find_inert, fisher_score, magnitude_score, projection_score, random_score
from .trainer import BeftTrainer

__version__ = "0.1.0"

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "ALL_BIASES",
    "BIAS_TYPES",
    "REPORT_NAME",
    "SCORE_NAMES",
    "AdapterError",
    "AdapterSet",
    "BeftAdapter",
    "BeftConfig",
    "BeftConfigError",
    "BeftTrainer",
    "BiasLayout",
    "BiasSelectionCallback",
    "BiasTypeError",
    "PeftExportError",
    "SelectionConfig",
    "SelectionReport",
    "__version__",
    "add_missing_biases",
    "base_model_fingerprint",
    "build_adapter",
    "check_adapter",
    "export_peft",
    "find_biases",
    "find_head_parameters",
    "find_inert",
    "fisher_score",
    "load_adapter",
    "magnitude_score",
    "plot_report",
    "projection_score",
    "random_score",
    "read_adapter",
    "read_report",
    "report_figure",
    "split_fused_qkv_bias",
    "write_report",
]
