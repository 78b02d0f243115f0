"""Serving many bias adapters on one base model: one batch mixing 1, 8, 64 tasks (issue #12).

On the real all-MiniLM-L6-v2 (CPU), one batch of real SST-2 validation sentences, timed as:

- ``base``: the base model alone (no adapter machinery installed);
- ``mixed``: BEFT mixed batch, ``model(**batch, adapter_names=[...])`` (beft_trainer.load_mixed_adapters);
- ``switch``: ``AdapterSet.set_adapter`` per task, one forward per task's rows;
- ``lora``: peft's mixed-batch LoRA (r=8 on the value projections, classifier in modules_to_save),
  ``adapter_names=`` with the same number of tasks.

Every condition runs the same batch, interleaved round-robin over ``--repeats`` rounds after a
warm-up; reported: median, min and max per forward. Memory: bytes of 1,000 loaded BEFT adapters
(the stacked bias tables + heads), against 1,000 LoRA adapters (counted) and 1,000 merged copies.

The adapters: one real v+head adapter trained here on SST-2 (a short BeftTrainer run), then
perturbed with seeded noise into as many tasks as needed (no need to train 1,000 tasks for timing).

    nice python benchmarks/serving.py --threads 1 --repeats 9
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile

import torch
import transformers as tf
from common import RESULTS, hardware, load_task, model_path, study_training_args

from beft_trainer import AdapterSet, BeftConfig, BeftTrainer, load_mixed_adapters, read_adapter

TASK_COUNTS = (1, 8, 64)


def train_real_adapter(folder: str, steps: int):
    """A v + head adapter of MiniLM trained on real SST-2 rows (short: timing does not need quality)."""
    tokenizer = tf.AutoTokenizer.from_pretrained(model_path())
    train, validation = load_task("sst2", tokenizer, 512, seed=0, max_length=64)
    model = tf.AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=2)
    args = study_training_args(folder + "/run", batch_size=16, steps=steps, seed=0, lr=3e-3)
    trainer = BeftTrainer(
        model,
        args,
        train_dataset=train,
        beft_config=BeftConfig(bias_types=["v"]),
        data_collator=tf.DataCollatorWithPadding(tokenizer),
    )
    trainer.train()
    trainer.save_adapter(folder + "/adapter")
    return read_adapter(folder + "/adapter"), tokenizer, validation


def perturbed(adapter, seed: int):
    """Another task: the real adapter's deltas and head moved by seeded noise (10% of their scale)."""
    generator = torch.Generator().manual_seed(seed)

    def jitter(t):
        return t + 0.1 * t.std() * torch.randn(t.shape, generator=generator, dtype=t.dtype)

    task = copy.copy(adapter)
    task.deltas = {n: jitter(t) for n, t in adapter.deltas.items()}
    task.head = {n: jitter(t) for n, t in adapter.head.items()}
    task.fixes = {}  # the fixes pin trained values of the real adapter, not of this one
    return task


def fresh_model():
    return tf.AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=2).eval()


def switch_forward(adapter_set, inputs, names):
    """What serving without mixed batches does: one forward per task, switching weights in between."""
    out = None
    for name in dict.fromkeys(names):
        rows = torch.tensor([i for i, n in enumerate(names) if n == name])
        adapter_set.set_adapter(name)
        logits = adapter_set.model(**{k: v[rows] for k, v in inputs.items()}).logits
        out = logits.new_empty(len(names), logits.shape[-1]) if out is None else out
        out[rows] = logits
    return out


def lora_model(tasks: int):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, target_modules=["value"], modules_to_save=["classifier"], init_lora_weights=False)
    model = get_peft_model(fresh_model(), config, adapter_name="t0")
    for i in range(1, tasks):
        model.add_adapter(f"t{i}", config)
    return model.eval()


def conditions(adapters, inputs):
    """name -> (callable, tasks): every timed forward, built once."""
    rows = inputs["input_ids"].shape[0]
    base = fresh_model()
    runs = {"base": (lambda: base(**inputs).logits, 0)}
    mixed_model = fresh_model()
    load_mixed_adapters(mixed_model, {f"t{i}": a for i, a in enumerate(adapters[: max(TASK_COUNTS)])})
    switch_model = fresh_model()
    adapter_set = AdapterSet(switch_model)
    for i, adapter in enumerate(adapters[: max(TASK_COUNTS)]):
        adapter_set.add(adapter, f"t{i}")
    lora = lora_model(max(TASK_COUNTS))
    for tasks in TASK_COUNTS:
        names = [f"t{i % tasks}" for i in range(rows)]
        runs[f"mixed/{tasks}"] = (lambda n=names: mixed_model(**inputs, adapter_names=n).logits, tasks)
        runs[f"switch/{tasks}"] = (lambda n=names: switch_forward(adapter_set, inputs, n), tasks)
        runs[f"lora/{tasks}"] = (lambda n=names: lora(**inputs, adapter_names=n).logits, tasks)
    return runs


def time_all(runs, repeats: int):
    import time

    times = {name: [] for name in runs}
    with torch.no_grad():
        for round_ in range(repeats + 1):  # round 0 warms up
            for name, (run, _) in runs.items():
                start = time.perf_counter()
                run()
                if round_:
                    times[name].append(time.perf_counter() - start)
    return times


def memory(adapter, count: int) -> dict:
    model = fresh_model()
    mixed = load_mixed_adapters(model, {f"t{i}": perturbed(adapter, 10_000 + i) for i in range(count)})
    held = mixed.memory_bytes()
    hidden, layers, labels = model.config.hidden_size, model.config.num_hidden_layers, 2
    lora_per_task = (layers * 8 * 2 * hidden + labels * hidden + labels) * 4  # r=8 A+B per value layer, head
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "adapters": count,
        "beft_tables_bytes": held["tables"],
        "beft_heads_bytes": held["modules"],
        "beft_total_bytes": held["tables"] + held["modules"],
        "lora_r8_total_bytes_counted": lora_per_task * count,
        "merged_copies_bytes": model_bytes * count,
        "base_model_bytes": model_bytes,
    }


def summarize(times, runs, rows: int) -> list[dict]:
    import statistics

    base = statistics.median(times["base"])
    table = []
    for name, values in times.items():
        median = statistics.median(values)
        # Paired: each round runs every condition back to back, so the ratio to that round's base
        # cancels slow drifts of a machine shared with other jobs.
        ratios = sorted(v / b for v, b in zip(values, times["base"], strict=True))
        table.append(
            {
                "condition": name.split("/")[0],
                "tasks": runs[name][1],
                "median_ms": 1e3 * median,
                "min_ms": 1e3 * min(values),
                "max_ms": 1e3 * max(values),
                "rows_per_s": rows / median,
                "vs_base": median / base,
                "paired_ratio_median": statistics.median(ratios),
                "paired_ratio_q1": ratios[len(ratios) // 4],
                "paired_ratio_q3": ratios[(3 * len(ratios)) // 4],
                "repeats": len(values),
            }
        )
    return table


def write_results(record: dict, stem: str) -> None:
    from matplotlib.figure import Figure

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(record, indent=2))
    lines = [
        "# Serving bias adapters: one batch, many tasks (all-MiniLM-L6-v2, CPU)",
        "",
        f"Machine: {record['hardware']}. Batch: {record['rows']} SST-2 validation sentences padded to "
        f"{record['seq_len']} tokens, fp32, `torch.set_num_threads({record['threads']})`, "
        f"{record['repeats']} interleaved rounds after a warm-up. Adapters: one real v+head adapter "
        f"trained here ({record['train_steps']} steps on SST-2), perturbed with seeded noise into each task.",
        "",
        f"Command: `{record['command']}`",
        "",
        "| condition | tasks in batch | median ms | min..max ms | rows/s | median / base median | paired ratio median (q1..q3) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in record["timings"]:
        lines.append(
            f"| {r['condition']} | {r['tasks']} | {r['median_ms']:.1f} | {r['min_ms']:.1f}..{r['max_ms']:.1f} | "
            f"{r['rows_per_s']:.1f} | {r['vs_base']:.3f} | {r['paired_ratio_median']:.3f} "
            f"({r['paired_ratio_q1']:.3f}..{r['paired_ratio_q3']:.3f}) |"
        )
    m = record["memory"]
    lines += [
        "",
        f"Target (mixed, 64 tasks, within 5% of the base model's forward time, judged on the paired "
        f"per-round ratio): **{record['target']}**.",
        "",
        f"Memory for {m['adapters']:,} loaded adapters: BEFT {m['beft_total_bytes'] / 2**20:.1f} MiB "
        f"(stacked bias tables {m['beft_tables_bytes'] / 2**20:.1f} MiB + heads {m['beft_heads_bytes'] / 2**20:.1f} MiB); "
        f"LoRA r=8 on value + head {m['lora_r8_total_bytes_counted'] / 2**20:.1f} MiB (counted); "
        f"merged copies {m['merged_copies_bytes'] / 2**30:.1f} GiB (base model {m['base_model_bytes'] / 2**20:.1f} MiB).",
    ]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    figure = Figure(figsize=(7, 4))
    axes = figure.add_subplot()
    for condition in ("mixed", "switch", "lora"):
        rows = [r for r in record["timings"] if r["condition"] == condition]
        axes.errorbar(
            [r["tasks"] for r in rows],
            [r["median_ms"] for r in rows],
            yerr=[[r["median_ms"] - r["min_ms"] for r in rows], [r["max_ms"] - r["median_ms"] for r in rows]],
            marker="o",
            capsize=3,
            label=condition,
        )
    base = next(r for r in record["timings"] if r["condition"] == "base")
    axes.axhline(base["median_ms"], color="black", linestyle="--", label="base model")
    axes.axhline(1.05 * base["median_ms"], color="gray", linestyle=":", label="base + 5%")
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("tasks in one batch")
    axes.set_ylabel("ms per forward (median, min..max)")
    axes.set_title(f"MiniLM, batch {record['rows']}x{record['seq_len']}, {record['threads']} thread(s)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(RESULTS / f"{stem}.png", dpi=120)


def main() -> None:
    """Train one adapter, time every condition, count memory, write results/serving_cpu.{md,json,png}."""
    import sys

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--memory-adapters", type=int, default=1000)
    parser.add_argument("--stem", default="serving_cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        adapter, tokenizer, validation = train_real_adapter(folder, args.train_steps)
    # Longer sentences keep their first tokens and [SEP]: every row is seq_len tokens or padded to it.
    ids = [validation[i]["input_ids"] for i in range(args.rows)]
    features = [{"input_ids": x if len(x) <= args.seq_len else x[: args.seq_len - 1] + x[-1:]} for x in ids]
    inputs = dict(tokenizer.pad(features, padding="max_length", max_length=args.seq_len, return_tensors="pt"))
    adapters = [adapter] + [perturbed(adapter, seed) for seed in range(1, max(TASK_COUNTS))]
    runs = conditions(adapters, inputs)
    times = time_all(runs, args.repeats)
    timings = summarize(times, runs, args.rows)
    mixed64 = next(r for r in timings if r["condition"] == "mixed" and r["tasks"] == 64)
    target = "met" if mixed64["paired_ratio_median"] <= 1.05 else "not met"
    record = {
        "hardware": hardware(),
        "threads": args.threads,
        "rows": args.rows,
        "seq_len": args.seq_len,
        "repeats": args.repeats,
        "train_steps": args.train_steps,
        "command": "nice python " + " ".join(["benchmarks/serving.py", *sys.argv[1:]]),
        "timings": timings,
        "target": f"{target} ({100 * (mixed64['paired_ratio_median'] - 1):+.1f}% paired median, "
        f"q1..q3 {100 * (mixed64['paired_ratio_q1'] - 1):+.1f}%..{100 * (mixed64['paired_ratio_q3'] - 1):+.1f}%)",
        "memory": memory(adapter, args.memory_adapters),
    }
    write_results(record, args.stem)
    print((RESULTS / f"{args.stem}.md").read_text())


if __name__ == "__main__":
    main()
