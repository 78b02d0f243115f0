"""beft-trainer: bias-efficient fine-tuning (BitFit, BEFT) for the Hugging Face Trainer."""

from .biases import ALL_BIASES, BIAS_TYPES, BiasLayout, add_missing_biases, find_biases, split_fused_qkv_bias
from .callback import BiasSelectionCallback
from .config import BeftConfig
from .errors import BeftConfigError, BiasTypeError
from .heads import find_head_parameters
from .report import REPORT_NAME, SelectionReport, read_report, write_report
from .scores import SCORE_NAMES, find_inert, fisher_score, magnitude_score, projection_score, random_score
from .trainer import BeftTrainer

__version__ = "0.1.0"

__all__ = [
    "ALL_BIASES",
    "BIAS_TYPES",
    "REPORT_NAME",
    "SCORE_NAMES",
    "BeftConfig",
    "BeftConfigError",
    "BeftTrainer",
    "BiasLayout",
    "BiasSelectionCallback",
    "BiasTypeError",
    "SelectionReport",
    "__version__",
    "add_missing_biases",
    "find_biases",
    "find_head_parameters",
    "find_inert",
    "fisher_score",
    "magnitude_score",
    "projection_score",
    "random_score",
    "read_report",
    "split_fused_qkv_bias",
    "write_report",
]
