"""The report of ``benchmarks/real_decoder.py``: markdown, JSON and a figure in ``benchmarks/results/``."""

from __future__ import annotations

import json
import re
from pathlib import Path

from common import DATA, RESULTS, sample_examples


def majority_rates(tasks: list[str], examples: int = 64) -> dict[str, float]:
    """The majority-class accuracy of each task's held-out sample (the runs' seed 0)."""
    from beft_trainer.recipes_support import get_prompt_task, load_prompt_task

    rates = {}
    for task in tasks:
        labels = sample_examples(load_prompt_task(get_prompt_task(task), data_dir=DATA)["validation"], examples, 0)[
            "label"
        ]
        rates[task] = max(labels.count(value) for value in set(labels)) / len(labels)
    return rates


def summary(records: list[dict]) -> dict:
    """Per task: the zero-shot accuracy and every finished run (sweep runs included)."""
    tasks: dict[str, dict] = {}
    for record in records:
        task = tasks.setdefault(record["task"], {"zero_shot_accuracy": record["zero_shot_accuracy"], "runs": []})
        task["runs"].append({k: v for k, v in record.items() if k not in ("task", "command")})
    return tasks


def markdown(records: list[dict], model_name: str, speed: dict | None, majority: dict[str, float]) -> str:
    """The results as tables, with the command of each run."""
    lines = [
        f"# Real decoder: {model_name} on prompt-based SST-2 and RTE (CPU)",
        "",
        "Produced by `python benchmarks/real_decoder.py sweep|study|report` (see its docstring); every run",
        "is `recipes/run_opt.py` on the converted Qwen2.5-Coder-0.5B-Instruct (`python -m",
        "beft_trainer.recipes_support.decoders prepare-qwen`), 128 training examples, batch 4, 64 held-out",
        "examples from `../shared/data/glue`, seed 0, linear decay. Zero-shot = the same model before any step.",
        "Majority class of the 64 held-out examples: "
        + ", ".join(f"{task} {rate:.3f}" for task, rate in majority.items())
        + ". 64 examples: one example is 0.016 of accuracy.",
        "",
        "| task | method | lr | steps | zero-shot acc | tuned acc | gold-word loss before -> after | selected | inert | trainable | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        loss = f"{r['zero_shot_loss']:.2f} -> {r['eval_loss']:.2f}" if r.get("zero_shot_loss") else ""
        lines.append(
            f"| {r['task']} | {r['method']} | {r['learning_rate'] or 'default (1e-3)'} | {r['steps']} "
            f"| {r['zero_shot_accuracy']:.3f} | {r['accuracy']:.3f} | {loss} | {'+'.join(r['selected'] or []) or '-'} "
            f"| {','.join(r.get('inert') or []) or '-'} | {r['trainable']:,} | {r['wall_s'] or '-'} |"
        )
    if speed:
        rates = speed["examples_per_s"]
        lines += [
            "",
            "## Evaluation speed (`python benchmarks/real_decoder.py eval-speed`)",
            "",
            f"{speed['examples']} SST-2 examples, batch 8, alternated twice in one process (best of two): one row "
            f"per label word {rates['per_word']:.2f} examples/s, one forward per example {rates['per_example']:.2f} "
            f"examples/s ({rates['per_example'] / rates['per_word']:.1f}x); same predictions: "
            f"{speed['same_predictions']}, largest log-likelihood gap {speed['max_log_likelihood_gap']:.1e}.",
        ]
    lines += ["", "## Commands", ""] + [f"- `{r['command']}`" for r in records]
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path, majority: dict[str, float]) -> None:
    """Accuracy per task: zero-shot, then each run; the dashed line is the majority class."""
    from matplotlib.figure import Figure

    tasks = sorted({r["task"] for r in records})
    figure = Figure(figsize=(4 + 2.5 * len(tasks), 3.6))
    axes = figure.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks, strict=True):
        runs = [r for r in records if r["task"] == task]
        labels = ["zero-shot"] + [f"{r['method']}\nlr {r['learning_rate'] or 'default'}" for r in runs]
        values = [runs[0]["zero_shot_accuracy"]] + [r["accuracy"] for r in runs]
        ax.bar(range(len(values)), values, color=["grey"] + ["tab:blue"] * len(runs))
        ax.set_xticks(range(len(values)), labels, fontsize=7)
        ax.axhline(majority[task], color="black", linestyle="--", linewidth=1, label="majority class")
        ax.legend(fontsize=7, loc="lower right")
        ax.set_ylim(0, 1)
        ax.set_title(task)
        ax.set_ylabel("held-out accuracy (64 examples)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def report(records: list[dict], model_name: str) -> None:
    """Write ``real_decoder_<model>.{md,json,png}``."""
    stem = f"real_decoder_{model_name}"  # the model name has dots: no with_suffix
    speed_file = RESULTS / f"{stem}_eval_speed.json"
    speed = json.loads(speed_file.read_text()) if speed_file.is_file() else None
    records = [r | {"command": relative_command(r["command"])} for r in records]
    majority = majority_rates(sorted({r["task"] for r in records}))
    summary_json = json.dumps({"tasks": summary(records), "majority": majority, "eval_speed": speed}, indent=2)
    (RESULTS / f"{stem}.json").write_text(summary_json + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(records, model_name, speed, majority))
    plot(records, RESULTS / f"{stem}.png", majority)
    print((RESULTS / f"{stem}.md").read_text())


def relative_command(command: str) -> str:
    """The run's command from the repository root (runs may come from a snapshot of it)."""
    command = re.sub(r"\S*/recipes/run_opt\.py", "python recipes/run_opt.py", command)
    command = re.sub(r"\S*/\.cache/", ".cache/", command)
    return re.sub(r"\S*/shared/data/", "../shared/data/", command)
