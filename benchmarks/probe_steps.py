"""How many probe steps are enough: BEFT's selection after N probe steps vs after a full BitFit run.

On the real all-MiniLM-L6-v2 and real GLUE data. For each N in ``--probe-steps`` a run with
``BiasSelectionCallback(probe_steps=N)`` and the same ``--steps`` schedule stops right after its
switch and records the selection and scores from the callback's report. The reference trains every
per-layer bias type (BitFit without the embedding LayerNorm bias) for all ``--steps`` steps at
BitFit's learning rate: a probe whose candidates are all bias types and that lasts the whole run;
q, k and v are then scored from the same report (projection, magnitude, Fisher: the paper's setting)
with the callback's inert rule applied among q, k and v. Every score comes from the library.

    python benchmarks/probe_steps.py --tasks sst2 rte --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import transformers as tf  # noqa: E402
from common import (  # noqa: E402
    RESULTS,
    TASKS,
    append_jsonl,
    default_learning_rate,
    hardware,
    load_task,
    make_trainer,
    model_path,
    read_jsonl,
    study_training_args,
)

from beft_trainer import BIAS_TYPES, SelectionConfig, find_inert  # noqa: E402
from beft_trainer.recipes_support import selection_report  # noqa: E402
from beft_trainer.scores import rank_types  # noqa: E402

CANDIDATES = ("q", "k", "v")
RUNS = RESULTS / "probe_steps_cpu_runs.jsonl"


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["sst2", "rte"], choices=list(TASKS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--probe-steps", nargs="+", type=int, default=[5, 10, 25, 50, 100])
    p.add_argument("--steps", type=int, default=150, help="schedule length, and the BitFit reference's steps")
    p.add_argument(
        "--lr", type=float, default=default_learning_rate("beft"), help="probing learning rate (default: beft's)"
    )
    p.add_argument("--bitfit-lr", type=float, default=default_learning_rate("bitfit"), help="the reference's")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=Path, default=RUNS)
    p.add_argument("--out", type=Path, default=RESULTS / "probe_steps_cpu")
    p.add_argument("--report-only", action="store_true")
    return p


class StopAfter(tf.TrainerCallback):
    """Ends training at a given step (after the selection callback's switch at that step)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def setup(task: str, seed: int, opts):
    """Model (seeded head), tokenised training data and collator."""
    tokenizer = tf.AutoTokenizer.from_pretrained(str(model_path()))
    train, _ = load_task(task, tokenizer, None, seed, opts.max_length)
    torch.manual_seed(seed)
    model = tf.AutoModelForSequenceClassification.from_pretrained(str(model_path()), num_labels=2)
    return model, train, tf.DataCollatorWithPadding(tokenizer)


def probe_report(task: str, seed: int, opts, selection: SelectionConfig, schedule: int, lr: float):
    """Train with ``selection`` on a ``schedule``-step schedule, stop at its switch, return the callback's report."""
    model, train, collator = setup(task, seed, opts)
    with tempfile.TemporaryDirectory() as out:
        args = study_training_args(out, opts.batch_size, schedule, seed, lr)
        trainer = make_trainer("beft", model, args, selection, train_dataset=train, data_collator=collator)
        trainer.add_callback(StopAfter(selection.probe_steps))
        trainer.train()
    return selection_report(trainer)


def type_scores(report) -> dict[str, dict[str, float]]:
    """Projection, magnitude and Fisher score of q, k and v from a selection report."""
    return {t: {s: report.type_scores(s)[t] for s in ("projection", "magnitude", "fisher")} for t in CANDIDATES}


def probe_run(task: str, seed: int, probe_steps: int, opts) -> dict:
    """Selection and type scores after ``probe_steps`` steps of probing."""
    report = probe_report(task, seed, opts, SelectionConfig(probe_steps=probe_steps), opts.steps, opts.lr)
    return {"selected": list(report.selected), "inert": sorted(report.inert or {}), "scores": type_scores(report)}


def bitfit_reference(task: str, seed: int, opts) -> dict:
    """Every bias type trains for ``--steps`` steps (the schedule runs one step longer, for the switch)."""
    selection = SelectionConfig(probe_steps=opts.steps, candidates=list(BIAS_TYPES), exclude_inert=False)
    scores = type_scores(probe_report(task, seed, opts, selection, opts.steps + 1, opts.bitfit_lr))
    inert = find_inert({t: s["fisher"] for t, s in scores.items()}, selection.inert_threshold)
    projection = {t: s["projection"] for t, s in scores.items()}
    return {
        "selected": rank_types(projection, list(inert), 1),
        "raw_argmax": rank_types(projection, [], 1),
        "inert": sorted(inert),
        "scores": scores,
    }


def collect(opts) -> None:
    """Every (task, seed, N) and reference not yet in ``--runs``."""
    done = {(r["task"], r["seed"], r["probe_steps"]) for r in read_jsonl(opts.runs)}
    for task in opts.tasks:
        for seed in opts.seeds:
            for n in [*opts.probe_steps, "bitfit"]:
                if (task, seed, n) in done:
                    continue
                result = bitfit_reference(task, seed, opts) if n == "bitfit" else probe_run(task, seed, n, opts)
                record = {
                    "task": task,
                    "seed": seed,
                    "probe_steps": n,
                    "steps": opts.steps,
                    "lr": opts.lr,
                    "bitfit_lr": opts.bitfit_lr,
                    "hardware": hardware(),
                } | result
                append_jsonl(opts.runs, record)
                print(json.dumps({k: record[k] for k in ("task", "seed", "probe_steps", "selected")}), flush=True)


def report(opts) -> None:
    """Markdown, JSON and PNG: selection per N, agreement with the BitFit reference, score ratios."""
    records = read_jsonl(opts.runs)
    refs = {(r["task"], r["seed"]): r for r in records if r["probe_steps"] == "bitfit"}
    probes = sorted(
        (r for r in records if r["probe_steps"] != "bitfit"), key=lambda r: (r["task"], r["seed"], r["probe_steps"])
    )
    r0 = records[0]
    lines = [
        "# How many probe steps are enough (all-MiniLM-L6-v2, real GLUE, CPU)",
        "",
        f"Hardware: {r0['hardware']}.",
        f"Command: `python benchmarks/probe_steps.py --tasks "
        f"{' '.join(sorted({r['task'] for r in records}))} --seeds "
        f"{' '.join(map(str, sorted({r['seed'] for r in records})))}`",
        "",
        f"Schedule: {r0['steps']} steps (linear, 10% warm-up), batch {opts.batch_size}, max length "
        f"{opts.max_length}; probing lr {r0['lr']:g}, BitFit reference lr {r0['bitfit_lr']:g} for all "
        f"{r0['steps']} steps. Projection score x1e3 for q/k/v; `inert` = Fisher mass < 1e-3 of the "
        "strongest type's (excluded from selection).",
        "",
        "| task | seed | probe steps | selected | agrees with BitFit ref | proj q | proj k | proj v | inert |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (task, seed), ref in sorted(refs.items()):
        for r in [p for p in probes if (p["task"], p["seed"]) == (task, seed)] + [ref]:
            agree = "–" if r is ref else ("yes" if r["selected"] == ref["selected"] else "no")
            proj = " | ".join(f"{1e3 * r['scores'][t]['projection']:.3f}" for t in CANDIDATES)
            label = (
                f"BitFit {r['steps']} (ref; raw argmax {','.join(r['raw_argmax'])})" if r is ref else r["probe_steps"]
            )
            lines.append(
                f"| {task} | {seed} | {label} | {','.join(r['selected'])} | {agree} | {proj} | "
                f"{','.join(r['inert']) or '–'} |"
            )
    agreement = agreement_by_n(probes, refs)
    lines += [
        "",
        "Agreement with the BitFit reference per probe length: "
        + ", ".join(f"{n}: {a}/{t}" for n, (a, t) in agreement.items())
        + ".",
    ]
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{opts.out}.md").write_text("\n".join(lines) + "\n")
    Path(f"{opts.out}.json").write_text(json.dumps({"agreement": agreement, "runs": records}, indent=1))
    plot(probes, refs, Path(f"{opts.out}.png"))
    print("\n".join(lines))


def agreement_by_n(probes: list[dict], refs: dict) -> dict:
    """{N: (runs agreeing with the reference, runs)}."""
    out: dict = {}
    for r in probes:
        ref = refs.get((r["task"], r["seed"]))
        if ref:
            agree, total = out.get(r["probe_steps"], (0, 0))
            out[r["probe_steps"]] = (agree + (r["selected"] == ref["selected"]), total + 1)
    return dict(sorted(out.items()))


def plot(probes: list[dict], refs: dict, path: Path) -> None:
    """Projection score of v relative to q per probe length, one line per (task, seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), sharex=True)
    for (task, seed), ref in sorted(refs.items()):
        runs = [p for p in probes if (p["task"], p["seed"]) == (task, seed)]
        xs = [p["probe_steps"] for p in runs]
        for ax, t in zip(axes, CANDIDATES, strict=False):
            line = ax.plot(xs, [p["scores"][t]["projection"] for p in runs], marker="o", label=f"{task} s{seed}")
            ax.axhline(ref["scores"][t]["projection"], ls="--", color=line[0].get_color(), lw=0.8)
    for ax, t in zip(axes, CANDIDATES, strict=False):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"projection score of {t} (dashed: BitFit ref)")
        ax.set_xlabel("probe steps")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    opts = build_parser().parse_args(argv)
    torch.set_num_threads(opts.threads)
    tf.logging.set_verbosity_error()
    if not opts.report_only:
        collect(opts)
    report(opts)


if __name__ == "__main__":
    main()
