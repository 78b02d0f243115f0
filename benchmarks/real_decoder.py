"""A real pretrained decoder on real data: Qwen2.5-Coder-0.5B-Instruct, prompt-based SST-2 and RTE, on CPU.

Each run is ``recipes/run_opt.py`` in its own process (the 2.5 GB model is freed between runs) and
appends one JSON line to ``--runs``, so the study resumes where it stopped. Every run evaluates
the untouched model first (``eval_on_start``): that is the zero-shot row. Methods: BEFT selection
over q/k/v, BEFT over the whole vector family within 0.02% (``beft_family``), the fixed v bias, LoRA
(r=8, peft's default q/v targets).

    python -m beft_trainer.recipes_support.decoders prepare-qwen --cache .cache/qwen2.5-0.5b
    nice python benchmarks/real_decoder.py sweep      # learning rates of the bias methods, SST-2
    nice python benchmarks/real_decoder.py study      # every task x method
    python benchmarks/real_decoder.py report          # markdown + JSON + PNG
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATA, RESULTS, append_jsonl, hardware, read_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "qwen2.5-coder-0.5b"
DEFAULT_MODEL = ROOT / ".cache" / "qwen2.5-0.5b" / "model"
RUNS = RESULTS / f"real_decoder_{MODEL_NAME}_runs.jsonl"

#: A selection over the whole vector family of Qwen2 (q/k/v biases and every projection's scaling
#: vectors) within 0.02% of the parameters, scored by attribution.
FAMILY_OPTIONS = {
    "candidates": "q,k,v," + ",".join(f"{p}_scale_{side}" for p in ("q", "k", "v", "attn_out", "mlp_in", "mlp_out")
                                     for side in ("in", "out")),
    "score": "attribution",
    "budget": 0.0002,
}  # fmt: skip
SELECTION_METHODS = ("beft", "beft_family")

#: The CPU budget of one run: the lead's set-up (128 training examples, batch 4, 64 held out).
BUDGET = {"max_train_samples": 128, "max_eval_samples": 64, "per_device_train_batch_size": 4, "max_seq_length": 128}


def recipe_argv(
    task: str, method: str, lr: float | None, steps: int, probe_steps: int, out: Path, model: Path, seed: int = 0
):
    """The run_opt.py command line of one run."""
    values = {
        "model_name_or_path": model,
        "task_name": task,
        "data_dir": DATA,
        "method": "beft" if method in SELECTION_METHODS else method,
        "output_dir": out,
        "max_steps": steps,
        "per_device_eval_batch_size": 8,
        "logging_steps": 1,
        "save_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
        "report_to": "none",
        "seed": seed,
        **BUDGET,
    }
    if lr is not None:
        values["learning_rate"] = lr
    if method in SELECTION_METHODS:
        values["probe_steps"] = probe_steps
    if method == "beft_family":
        values |= FAMILY_OPTIONS
    return [sys.executable, str(ROOT / "recipes" / "run_opt.py")] + [
        item for key, value in values.items() for item in (f"--{key}", str(value))
    ]


def run_one(task: str, method: str, lr: float | None, opts, seed: int = 0) -> dict:
    """One recipe run; its results, timings and the evaluation speed."""
    suffix = f"-seed{seed}" if seed else ""
    out = Path(opts.work) / f"{task}-{method.replace(',', '')}-{lr}-{opts.steps}{suffix}"
    argv = recipe_argv(task, method, lr, opts.steps, opts.probe_steps, out, Path(opts.model), seed)
    start = time.perf_counter()
    log = out.parent / f"{out.name}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    finished = (out / "eval_results.json").is_file()  # a run whose line was not appended (interrupted)
    if not finished:
        with open(log, "w") as f:
            # This checkout's library, not whichever copy the interpreter has installed.
            env = os.environ | {"PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
            subprocess.run(argv, check=True, stdout=f, stderr=subprocess.STDOUT, env=env)
    results = json.loads((out / "eval_results.json").read_text())
    report_file = out / "beft_selection.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    return {
        "task": task,
        "method": method,
        "learning_rate": lr,
        "steps": opts.steps,
        "seed": seed,
        "probe_steps": opts.probe_steps if method in SELECTION_METHODS else None,
        "zero_shot_accuracy": results["untuned"].get("eval_accuracy"),
        "zero_shot_loss": results["untuned"].get("eval_loss"),
        "accuracy": results["final"]["eval_accuracy"],
        "eval_loss": results["final"]["eval_loss"],
        "eval_examples_per_s": results["final"].get("eval_samples_per_second"),
        "selected": results.get("selected"),
        "inert": sorted(report.get("inert", {})),
        "type_scores": {
            t: {k: v for k, v in s.items() if k != "per_layer"} for t, s in report.get("scores", {}).items()
        },
        "trainable": results["trainable_parameters"]["trainable"],
        "wall_s": None if finished else round(time.perf_counter() - start, 1),
        "command": " ".join(argv[1:]),
    }


def run_all(jobs: list[tuple], opts) -> None:
    """Run the jobs not yet in ``--runs``, appending one line each."""
    done = {
        (r["task"], r["method"], r["learning_rate"], r["steps"], r.get("seed", 0)) for r in read_jsonl(Path(opts.runs))
    }
    for task, method, lr, seed in jobs:
        if (task, method, lr, opts.steps, seed) in done:
            continue
        record = run_one(task, method, lr, opts, seed)
        record["hardware"] = hardware()
        append_jsonl(Path(opts.runs), record)
        print(json.dumps({k: v for k, v in record.items() if k != "command"}), flush=True)


def eval_speed(opts, examples: int = 16, repeats: int = 2) -> dict:
    """Held-out scoring, one row per label word vs one forward per example, alternated in one process."""
    import torch
    import transformers as tf

    from beft_trainer.recipes_support import (
        answer_log_likelihood,
        encode_candidates,
        get_prompt_task,
        label_word_evaluation,
        load_prompt_task,
        sample_examples,
    )

    task = get_prompt_task("sst2")
    tokenizer = tf.AutoTokenizer.from_pretrained(opts.model)
    model = tf.AutoModelForCausalLM.from_pretrained(opts.model, dtype=torch.float32)
    held_out = sample_examples(load_prompt_task(task, data_dir=DATA)["validation"], examples, 0)
    fast_rows, fast_scores = label_word_evaluation(held_out, tokenizer, task, 128)
    paths = {"per_word": (encode_candidates(held_out, tokenizer, task, 128), answer_log_likelihood)}
    paths["per_example"] = (fast_rows, fast_scores)
    args = tf.TrainingArguments(opts.work, per_device_eval_batch_size=8, use_cpu=True, report_to=[])
    collator = tf.DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    scores = {}
    for _ in range(repeats):
        for name, (rows, preprocess) in paths.items():
            trainer = tf.Trainer(model, args, data_collator=collator, preprocess_logits_for_metrics=preprocess)
            start = time.perf_counter()
            scores[name] = torch.as_tensor(trainer.predict(rows).predictions).reshape(examples, -1)
            seconds[name].append(time.perf_counter() - start)
    agree = bool(torch.equal(scores["per_word"].argmax(-1), scores["per_example"].argmax(-1)))
    gap = float((scores["per_word"] - scores["per_example"]).abs().max())
    return {
        "examples": examples,
        "examples_per_s": {name: examples / min(s) for name, s in seconds.items()},
        "seconds": seconds,
        "same_predictions": agree,
        "max_log_likelihood_gap": gap,
        "hardware": hardware(),
    }


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``sweep``, ``study`` or ``report``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("sweep", "study", "report", "eval-speed"))
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="The converted model folder.")
    parser.add_argument("--runs", default=str(RUNS))
    parser.add_argument("--work", default=str(ROOT / ".cache" / "real_decoder_runs"))
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--probe_steps", type=int, default=6)
    parser.add_argument("--tasks", nargs="+", default=["sst2", "rte"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--methods", nargs="+", default=["beft", "v", "lora"])
    parser.add_argument("--learning_rates", nargs="+", type=float, default=[1e-2, 1e-3, 3e-3])
    return parser


def main(argv: list[str] | None = None) -> None:
    """Sweep, study or report."""
    opts = build_parser().parse_args(argv)
    if opts.command == "sweep":
        run_all([("sst2", "beft", lr, seed) for lr in opts.learning_rates for seed in opts.seeds], opts)
    elif opts.command == "study":
        jobs = [(task, method, None, seed) for seed in opts.seeds for task in opts.tasks for method in opts.methods]
        run_all(jobs, opts)
    elif opts.command == "eval-speed":
        result = eval_speed(opts)
        (RESULTS / f"real_decoder_{MODEL_NAME}_eval_speed.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    else:
        from real_decoder_report import report

        report(read_jsonl(Path(opts.runs)), MODEL_NAME)


if __name__ == "__main__":
    main()
