"""GLUE tasks for encoder fine-tuning: the task table, loading, tokenization, metrics.

The same code serves any local classification/regression task whose files use the Hub's GLUE
column names (``sentence``, ``sentence1``/``sentence2``, ``question``/``sentence``, ``label``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BeftConfigError
from .data import SplitSpec, load_splits

logger = logging.getLogger(__name__)

#: The Hub dataset that holds GLUE (the old ``glue`` script name no longer loads in ``datasets`` 4+).
GLUE_HUB_NAME = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: its input columns, label count (1 = regression) and GLUE metric names."""

    name: str
    text_columns: tuple[str, ...]
    num_labels: int
    metrics: tuple[str, ...]
    validation_split: str = "validation"

    @property
    def is_regression(self) -> bool:
        """STS-B predicts a similarity score, every other task a class."""
        return self.num_labels == 1

    @property
    def main_metric(self) -> str:
        """The metric reported first (and used for model selection)."""
        return self.metrics[0]


#: The eight GLUE tasks the recipes support, with the metric names ``evaluate``'s ``glue`` uses.
GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("cola", ("sentence",), 2, ("matthews_correlation",)),
    "sst2": GlueTask("sst2", ("sentence",), 2, ("accuracy",)),
    "mrpc": GlueTask("mrpc", ("sentence1", "sentence2"), 2, ("f1", "accuracy")),
    "stsb": GlueTask("stsb", ("sentence1", "sentence2"), 1, ("pearson", "spearmanr")),
    "qqp": GlueTask("qqp", ("question1", "question2"), 2, ("f1", "accuracy")),
    "mnli": GlueTask("mnli", ("premise", "hypothesis"), 3, ("accuracy",), validation_split="validation_matched"),
    "qnli": GlueTask("qnli", ("question", "sentence"), 2, ("accuracy",)),
    "rte": GlueTask("rte", ("sentence1", "sentence2"), 2, ("accuracy",)),
}


def get_task(task_name: str) -> GlueTask:
    """The spec of a GLUE task by its Hub config name (``sst2``, ``cola``, ...)."""
    key = task_name.lower()
    if key not in GLUE_TASKS:
        raise BeftConfigError(f"--task_name {task_name!r}: unknown GLUE task; choose one of {', '.join(GLUE_TASKS)}.")
    return GLUE_TASKS[key]


def split_spec(task: GlueTask) -> SplitSpec:
    """What each split of ``task`` must hold: its text columns and ``label``."""
    return SplitSpec(task.name, tuple((column,) for column in task.text_columns), task.num_labels)


def load_glue(
    task: GlueTask,
    train_file: str | None = None,
    validation_file: str | None = None,
    data_dir: str | os.PathLike | None = None,
):
    """The checked ``train`` and ``validation`` splits of a GLUE task (sources: ``data.load_splits``)."""
    hub = (GLUE_HUB_NAME, task.name)
    return load_splits(split_spec(task), hub, task.validation_split, train_file, validation_file, data_dir)


def tokenize_glue(dataset, tokenizer, task: GlueTask, max_length: int = 128):
    """Tokenize one split: the task's text columns become ``input_ids``/``attention_mask``, plus ``labels``.

    Padding is left to the collator (dynamic padding per batch); the split was checked when loaded.
    """

    def encode(batch: dict[str, list]) -> dict[str, Any]:
        return encode_glue_batch(batch, tokenizer, task, max_length)

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc=f"Tokenizing {task.name}")


def encode_glue_batch(batch: dict[str, list], tokenizer, task: GlueTask, max_length: int = 128) -> dict[str, Any]:
    """Columns of rows (the task's text columns and ``label``) as ``input_ids``/``attention_mask``/``labels``."""
    texts = [batch[column] for column in task.text_columns]
    encoded = tokenizer(*texts, truncation=True, max_length=max_length)
    labels = batch["label"]
    encoded["labels"] = [float(x) for x in labels] if task.is_regression else [int(x) for x in labels]
    return encoded


# -- metrics ------------------------------------------------------------------------------------


def sklearn_glue_metric(task: GlueTask) -> Callable[[np.ndarray, np.ndarray], dict[str, float]]:
    """GLUE's metric for ``task`` from scikit-learn/scipy, with the keys ``evaluate``'s ``glue`` uses."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    functions = {
        "accuracy": accuracy_score,
        "f1": f1_score,
        "matthews_correlation": matthews_corrcoef,
        "pearson": lambda refs, preds: pearsonr(preds, refs)[0],
        "spearmanr": lambda refs, preds: spearmanr(preds, refs)[0],
    }

    def compute(predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
        return {name: float(functions[name](references, predictions)) for name in task.metrics}

    return compute


def load_glue_metric(task: GlueTask) -> Callable[[np.ndarray, np.ndarray], dict[str, float]]:
    """``evaluate``'s GLUE metric when it loads, else the scikit-learn/scipy equivalent.

    ``evaluate.load`` needs the Hub; offline (``HF_HUB_OFFLINE=1``) it fails fast and the
    packaged equivalent, which computes the same numbers, is used.
    """
    try:
        import evaluate

        metric = evaluate.load("glue", task.name)
    except Exception as error:  # evaluate raises many types offline (ConnectionError, FileNotFoundError, ...)
        logger.info("evaluate's glue metric is unavailable (%s); using scikit-learn/scipy.", type(error).__name__)
        return sklearn_glue_metric(task)

    def compute(predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
        return {k: float(v) for k, v in metric.compute(predictions=predictions, references=references).items()}

    return compute


def glue_compute_metrics(task: GlueTask) -> Callable[[Any], dict[str, float]]:
    """A ``compute_metrics`` for the Trainer: logits to predictions, then GLUE's metric."""
    metric = load_glue_metric(task)

    def compute_metrics(eval_prediction) -> dict[str, float]:
        logits = eval_prediction.predictions
        logits = logits[0] if isinstance(logits, tuple) else logits
        predictions = np.squeeze(logits, -1) if task.is_regression else np.argmax(logits, axis=-1)
        return metric(predictions, eval_prediction.label_ids)

    return compute_metrics
