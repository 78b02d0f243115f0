"""Where does a selection run's edge over its kept type trained alone come from?

A selection run is not its kept type trained alone: for ``probe_steps`` every candidate trains with the
head, then the others are frozen (and rewound), while the head and the kept types go on from where the
probe left them. This ablation repeats a family selection run and, at the switch, sends back to their
starting values (their optimizer state dropped, so Adam starts afresh for them):

- ``rewind_head``: the head (the fresh classifier), so only the kept types carry the probe's training;
- ``rewind_kept``: the kept types (to their pretrained values), so only the head carries it;
- ``rewind_both``: both, so the run is the kept types trained alone, ``probe_steps`` shorter.

Its runs go to their own file; the report sets them beside the plain selection and the kept type alone from
the family study's runs file (same steps, seeds and options).

    nice python benchmarks/switch_ablation.py run --task cola --seeds 0 --steps 1000 --probe-steps 100 \\
        --runs benchmarks/results/switch_ablation_minilm_1000_cpu_runs.jsonl &   # and --seeds 1: one per core
    python benchmarks/switch_ablation.py report --task cola --steps 1000 \\
        --runs benchmarks/results/switch_ablation_minilm_1000_cpu_runs.jsonl \\
        --family-runs benchmarks/results/family_head_classifier_minilm_1000_cpu_runs.jsonl \\
        --out benchmarks/results/switch_ablation_minilm_1000_cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import transformers as tf  # noqa: E402
from common import (  # noqa: E402
    TASKS,
    append_jsonl,
    device_tag,
    hardware,
    paired_difference,
    read_jsonl,
    train_and_score,
)
from family import (  # noqa: E402
    SELECTIONS,
    build_trainer,
    config_key,
    learning_rate,
    non_default_options,
    parse_config_options,
    resolve_model,
)

from beft_trainer import BeftConfig  # noqa: E402
from beft_trainer.distributed import innermost_optimizer  # noqa: E402
from beft_trainer.groups import HEAD_GROUPS, head_parameter_names  # noqa: E402

#: Variant -> what goes back to its starting value at the switch.
VARIANTS = {"rewind_head": ("head",), "rewind_kept": ("kept",), "rewind_both": ("head", "kept")}
#: What each variant's row says it is.
VARIANT_LABELS = {
    "rewind_head": "`rewind_head`: the head back to its initial values at the switch",
    "rewind_kept": "`rewind_kept`: the kept types back to pretrained at the switch",
    "rewind_both": "`rewind_both`: both back at the switch",
}


class RewindAtSwitch(tf.TrainerCallback):
    """At the switch, return the head and/or the kept types to their starting values (one process, no ZeRO)."""

    def __init__(self, trainer, parts: tuple[str, ...]) -> None:
        self.trainer, self.parts, self.done = trainer, parts, False
        self.initial_head: dict[str, torch.Tensor] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        head = set(head_parameter_names(self.trainer.parameter_groups))
        self.initial_head = {n: p.detach().clone() for n, p in self.trainer.model.named_parameters() if n in head}

    def on_step_end(self, args, state, control, **kwargs):
        selected = self.trainer.selection_callback.selected
        if self.done or selected is None:
            return
        self.done = True
        trainer = self.trainer
        groups = []
        if "head" in self.parts:
            params = dict(trainer.model.named_parameters())
            with torch.no_grad():
                for name, value in self.initial_head.items():
                    params[name].copy_(value)
            groups += [g for g in HEAD_GROUPS if g in trainer.group_index]
        if "kept" in self.parts:
            # The trainer's own rewind (private): it writes the pretrained values as the switch does for frozen types.
            trainer._rewind([n for t in selected for n in trainer.parameter_groups[t]])
            groups += list(selected)
        # Dropped, not zeroed: Adam starts afresh (step 1) as in a run that trains them from the start.
        optimizer = innermost_optimizer(trainer.optimizer)
        for index in (trainer.group_index[g] for g in groups):
            for param in optimizer.param_groups[index]["params"]:
                optimizer.state.pop(param, None)


def run_one(task: str, variant: str, seed: int, opts) -> dict:
    """One selection run of ``opts.selection`` with ``variant``'s rewind at the switch."""

    def build(model, args, **data):
        trainer = build_trainer(opts.selection, model, args, opts, **data)
        trainer.add_callback(RewindAtSwitch(trainer, VARIANTS[variant]))
        return trainer

    label = f"{opts.model} {task} {opts.selection} {variant} seed {seed}"
    run = train_and_score(resolve_model(opts.model), task, seed, opts.lr, opts, build, label=label)
    return run.record(task, opts.selection, seed, opts.lr, opts) | {
        "model": opts.model,
        "variant": variant,
        "probe_steps": opts.probe_steps,
        "config": opts.config_option or None,
        "hardware": hardware(),
        "device": device_tag(),
    }


def run_key(record: dict) -> tuple:
    """What identifies a run in the ablation's runs file."""
    return (record["model"], record["task"], record["method"], record["variant"], record["seed"], record["steps"])


def run(opts) -> None:
    """Every (seed, variant) not yet in ``--runs``, one after another (start one process per core)."""
    torch.set_num_threads(1)
    tf.logging.set_verbosity_error()
    for seed in opts.seeds:
        for variant in opts.variants:
            key = (opts.model, opts.task, opts.selection, variant, seed, opts.steps)
            done = {run_key(r) for r in read_jsonl(opts.runs)} if opts.runs.exists() else set()
            if key in done:
                continue
            record = run_one(opts.task, variant, seed, opts)
            append_jsonl(opts.runs, record)
            print(json.dumps({k: record[k] for k in ("task", "variant", "seed", "score", "selected")}), flush=True)


def matching(records: list[dict], opts, method: str, config: str) -> dict[int, dict]:
    """``method``'s runs on the task with these steps and BeftConfig options, by seed."""
    return {
        r["seed"]: r
        for r in records
        if r["task"] == opts.task and r["method"] == method and r["steps"] == opts.steps and config_key(r) == config
    }


def report_rows(opts) -> list[dict]:
    """One row per variant: the plain selection, its kept type alone, and the rewinds; scores per seed."""
    family = read_jsonl(opts.family_runs)
    config = json.dumps(non_default_options(opts.config_option, BeftConfig), sort_keys=True)
    plain = matching(family, opts, opts.selection, config)
    rows = [{"variant": "selection (head and kept types go on)", "runs": plain}]
    kept = {tuple(r["selected"]) for r in plain.values()}
    if len(kept) == 1:
        types = next(iter(kept))
        if len(types) == 1:
            rows.append({"variant": f"{types[0]} trained alone", "runs": matching(family, opts, types[0], config)})
    ablation = read_jsonl(opts.runs) if opts.runs.exists() else []
    for variant in VARIANTS:
        runs = matching([r for r in ablation if r["variant"] == variant], opts, opts.selection, config)
        rows.append({"variant": VARIANT_LABELS[variant], "runs": runs})
    return rows


def report(opts) -> None:
    """Markdown and JSON: each row against the plain selection, paired on the seeds both ran."""
    rows = report_rows(opts)
    selection = rows[0]["runs"]
    if not selection:
        raise SystemExit(f"report: {opts.family_runs} has no {opts.selection} runs of this setting.")
    lines = [
        f"# What a selection run carries over its switch ({opts.model}, {opts.task}, {opts.steps} steps)",
        "",
        f"`{opts.selection}` with probe {opts.probe_steps} steps; BeftConfig options {opts.config_option or 'defaults'}."
        f" Scores x100 ({_metric(rows)}); each row against the selection on the seeds both ran (difference: the"
        " row minus the selection, ± its standard error over those seeds).",
        "",
        "| run | seeds | mean | the selection there | difference | per seed | trained types | mean train loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        row |= _against(row["runs"], selection)
        if not row["seeds"]:
            lines.append(f"| {row['variant']} | none run yet | | | | | | |")
            continue
        runs = [row["runs"][s] for s in row["seeds"]]
        trained = sorted({", ".join(r["selected"] or [r["method"]]) for r in runs})
        loss = statistics.mean(r["train_loss"] for r in runs)
        error = f" ± {row['standard_error']:.1f}" if row["standard_error"] is not None else ""
        difference = "–" if row is rows[0] else f"{row['difference']:+.1f}{error}"
        per_seed = ", ".join(f"{100 * r['score']:.1f}" for r in runs)
        lines.append(
            f"| {row['variant']} | {', '.join(map(str, row['seeds']))} | {row['mean']:.1f} | {row['selection']:.1f} | "
            f"{difference} | {per_seed} | {'; '.join(trained)} | {loss:.4f} |"
        )
    lines += ["", f"Command: `python benchmarks/switch_ablation.py report {_arguments(opts)}`."]
    Path(f"{opts.out}.md").write_text("\n".join(lines) + "\n")
    fields = ("variant", "seeds", "mean", "selection", "difference", "standard_error")
    Path(f"{opts.out}.json").write_text(json.dumps([{k: r[k] for k in fields} for r in rows], indent=2) + "\n")
    print("\n".join(lines))


def _against(runs: dict[int, dict], selection: dict[int, dict]) -> dict:
    """``runs``' mean, the selection's, and the paired difference on the seeds both ran."""
    ours, theirs = ({s: 100 * r["score"] for s, r in side.items()} for side in (runs, selection))
    paired = paired_difference(ours, theirs)
    if paired is None:
        return {"seeds": [], "mean": None, "selection": None, "difference": None, "standard_error": None}
    return {
        "seeds": paired.seeds,
        "mean": statistics.mean(ours[s] for s in paired.seeds),
        "selection": statistics.mean(theirs[s] for s in paired.seeds),
        "difference": paired.mean,
        "standard_error": paired.standard_error,
    }


def _metric(rows: list[dict]) -> str:
    return next(r["metric"] for row in rows for r in row["runs"].values())


def _arguments(opts) -> str:
    config = " ".join(f"{k}={json.dumps(v)}" for k, v in opts.config_option.items())
    return (
        f"--model {opts.model} --task {opts.task} --steps {opts.steps} --probe-steps {opts.probe_steps} "
        f"--selection {opts.selection} --runs {opts.runs} --family-runs {opts.family_runs}"
        + (f" --config-option '{config}'" if config else "")
        + f" --out {opts.out}"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("run", "report"))
    p.add_argument("--model", default="minilm", choices=("minilm", "mpnet"))
    p.add_argument("--task", default="cola", choices=list(TASKS))
    p.add_argument("--selection", default="auto_family_0.02%", choices=list(SELECTIONS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--probe-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument(
        "--config-option",
        nargs="+",
        default=['head_modules=["classifier"]'],
        metavar="OPTION=VALUE",
        help="BeftConfig options, as in family.py (default: today's head, spelled out as the study's runs file has it)",
    )
    p.add_argument("--runs", type=Path, required=True, help="this ablation's JSON lines")
    p.add_argument("--family-runs", type=Path, help="report: the family study's runs of the same setting")
    p.add_argument("--out", type=Path, help="report: prefix of the .md and .json")
    return p


def main(argv: list[str] | None = None) -> None:
    opts = build_parser().parse_args(argv)
    opts.config_option = parse_config_options(opts.config_option, [opts.selection])
    opts.selection_option = {}
    opts.lr = learning_rate(opts.selection, {})
    if opts.mode == "run":
        run(opts)
        return
    if opts.family_runs is None or opts.out is None:
        raise SystemExit("report: give --family-runs (the family study's runs file) and --out PREFIX.")
    report(opts)


if __name__ == "__main__":
    main()
