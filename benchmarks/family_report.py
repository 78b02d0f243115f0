"""Report of ``family.py``: quality per method, how well each score picks the best type, and the plot.

Called by ``python benchmarks/family.py report``; writes ``--out``.md/.json/.png. Works on a
partial grid: every table says how many seeds it rests on.
"""

from __future__ import annotations

import json
import shlex
import statistics
from pathlib import Path

from common import ROOT, TASKS, hardware, metric_name, paired_difference, read_jsonl
from family import (
    BASELINES,
    FAMILY,
    METHODS,
    SELECTIONS,
    build_parser,
    check_one_setting,
    config_key,
    default_out,
    default_runs,
    option_defaults,
    shared_baselines,
)

from beft_trainer import BeftConfig, SelectionConfig
from beft_trainer.biases import SCALING_TYPES

#: Scores stored in each selection run's report, plus totals over a type's parameters: the
#: budgeted selection adds scores of types of different sizes, so it needs to know which is comparable.
SCORES = (
    "projection",
    "magnitude",
    "movement",
    "fisher",
    "attribution",
    "fisher_mass",
    "attribution_per_parameter",
    "random",
)

#: Which single types a panel labels (the others pile up at one size).
SINGLES_LABELLED = "single types: the best three and the worst labelled"


def candidate_score(entry: dict, score: str) -> float:
    """One score of one candidate; ``*_mass`` is a per-parameter score times the type's size, and
    ``*_per_parameter`` a type's total divided by it. Runs from before ``movement`` was a score get
    its definition, magnitude times size (every vector of a type has the same size)."""
    if score == "movement" and score not in entry:
        return entry["magnitude"] * entry["parameters"]
    if score.endswith("_mass"):
        return entry[score.removesuffix("_mass")] * entry["parameters"]
    if score.endswith("_per_parameter"):
        return entry[score.removesuffix("_per_parameter")] / entry["parameters"]
    return entry[score]


def summarize(records: list[dict]) -> dict:
    """{task: {method: {mean, std, n, scores, seeds, trainable_parameters, lr, selected}}}."""
    grouped: dict = {}
    for r in records:
        grouped.setdefault(r["task"], {}).setdefault(r["method"], []).append(r)
    out: dict = {}
    for task, methods in grouped.items():
        for method, runs in methods.items():
            runs.sort(key=lambda r: r["seed"])
            scores = [100 * r["score"] for r in runs]
            out.setdefault(task, {})[method] = {
                "mean": statistics.mean(scores),
                "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                "n": len(scores),
                "scores": scores,
                "seeds": [r["seed"] for r in runs],
                "trainable_parameters": statistics.mean(r["trainable_parameters"] for r in runs),
                "lr": runs[0]["lr"],
                "selected": ["+".join(r["selected"]) for r in runs] if runs[0]["selected"] else None,
            }
    return out


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None below 3 points."""
    if len(xs) < 3:
        return None

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2
            i = j + 1
        return result

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    norm = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / norm if norm else None


def score_analysis(records: list[dict], probe_steps: int) -> list[dict]:
    """Per selection run and score: the type that score ranks first, its gap to the best single type, rho.

    Over every non-inert candidate, over those that fit each family budget alone (at 0.02% on
    MiniLM: the types of one hidden size, bias and scaling vectors mixed, which the budgeted selection
    chooses among), and over a family probe's bias types (decided as soon as those are trained alone,
    before the twelve scaling vectors are).
    """
    # Keyed by the BeftConfig options too: a probe's ground truth is the types trained alone with its head.
    single = {
        (r["task"], r["seed"], r["method"], config_key(r)): 100 * r["score"] for r in records if r["method"] in FAMILY
    }
    budgets = sorted({options["budget"] for options in SELECTIONS.values() if "budget" in options})
    rows, probes = [], set()
    for run in records:
        if not run.get("candidate_scores"):
            continue
        eligible = [t for t in run["candidate_scores"] if t not in run["inert"]]
        over_family = len(run["candidate_scores"]) != 3
        label = f"family of {len(FAMILY)}" if over_family else "q, k, v"
        if (run.get("selection") or {}).get("scale_probe_learning_rate") is False:
            label += ", probed at the full rate"
        if run["probe_steps"] != probe_steps:
            label += f", {run['probe_steps']} probing steps"
        if probe_key(run) in probes:
            continue
        probes.add(probe_key(run))
        keys = {t: (run["task"], run["seed"], t, config_key(run)) for t in eligible}
        truth = {t: single[key] for t, key in keys.items() if key in single}
        biases = [t for t in eligible if t not in SCALING_TYPES]
        if over_family and 1 < len(biases) < len(eligible) and all(t in truth for t in biases):
            rows += _ranking_rows(run, f"{label}: its {len(biases)} bias types", {t: truth[t] for t in biases})
        if len(truth) == len(eligible):
            rows += _ranking_rows(run, label, truth)
        for budget in budgets if over_family else ():
            # A budget's types are ranked once they are all trained alone, before the larger ones are.
            fitting = [
                t for t in eligible if run["candidate_scores"][t]["parameters"] <= budget * run["total_parameters"]
            ]
            if 1 < len(fitting) < len(eligible) and all(t in truth for t in fitting):
                fitting_truth = {t: truth[t] for t in fitting}
                rows += _ranking_rows(run, f"{label}: the {len(fitting)} that fit {100 * budget:g}%", fitting_truth)
    return rows


def probe_key(run: dict) -> tuple:
    """What identifies a selection run's probe: selections that differ only by budget or score share one
    (same task, seed, candidates, probing steps, probing rate and BeftConfig options), and their stored scores are
    the same."""
    full_rate = (run.get("selection") or {}).get("scale_probe_learning_rate") is False
    return run["task"], run["seed"], len(run["candidate_scores"]), run["probe_steps"], full_rate, config_key(run)


def _ranking_rows(run: dict, label: str, truth: dict[str, float]) -> list[dict]:
    """One row per score: which of the ``truth`` types (name -> trained alone) it ranks first, gap and rho."""
    best = max(truth, key=truth.get)
    rows = []
    for score in SCORES:
        values = {t: candidate_score(run["candidate_scores"][t], score) for t in truth}
        picked = max(values, key=values.get)
        rows.append(
            {
                "task": run["task"],
                "seed": run["seed"],
                "run": label,
                "score": score,
                "picked": picked,
                "best": best,
                "gap": truth[best] - truth[picked],
                "rho": spearman([values[t] for t in truth], [truth[t] for t in truth]),
            }
        )
    return rows


def score_table(rows: list[dict]) -> list[str]:
    """Markdown: per candidate set and score, hits, mean gap and mean rho over runs."""
    lines = [
        "| candidates | score | probes | picks the best type | mean gap to the best (points) | mean Spearman rho |",
        "|---|---|---|---|---|---|",
    ]
    for run in sorted({r["run"] for r in rows}):
        for score in SCORES:
            subset = [r for r in rows if r["run"] == run and r["score"] == score]
            rhos = [r["rho"] for r in subset if r["rho"] is not None]
            hits = sum(r["picked"] == r["best"] for r in subset)
            rho = f"{statistics.mean(rhos):+.2f}" if rhos else "–"
            gap = statistics.mean(r["gap"] for r in subset)
            lines.append(f"| {run} | {score} | {len(subset)} | {hits}/{len(subset)} | {gap:.1f} | {rho} |")
    return lines


def separation_table(records: list[dict]) -> list[str]:
    """Markdown: how far each score spreads the smallest candidates of a family probe (needs no single runs).

    A budget that holds one or two types chooses among the types of the smallest size; a score that
    gives them all about the same value chooses by noise there. Per score, over distinct probes: the
    top type's value over the median, and the coefficient of variation (std / mean).
    """
    spreads: dict[str, list[tuple[float, float]]] = {}
    probes = set()
    for run in records:
        scores = run.get("candidate_scores") or {}
        if len(scores) <= 3 or probe_key(run) in probes:
            continue  # q/k/v probes have one size
        probes.add(probe_key(run))
        smallest = min(entry["parameters"] for entry in scores.values())
        types = [t for t, entry in scores.items() if entry["parameters"] == smallest and t not in run["inert"]]
        for score in SCORES:
            values = [candidate_score(scores[t], score) for t in types]
            mean = statistics.mean(values)
            if mean > 0:
                spread = (max(values) / statistics.median(values), statistics.pstdev(values) / mean)
                spreads.setdefault(score, []).append(spread)
    lines = [
        "| score | probes | top over median | coefficient of variation |",
        "|---|---|---|---|",
    ]
    for score, values in spreads.items():
        top, cv = (statistics.mean(v[i] for v in values) for i in (0, 1))
        lines.append(f"| {score} | {len(values)} | {top:.2f} | {cv:.2f} |")
    return lines


def quality_table(summary: dict, tasks: list[str]) -> list[str]:
    """Markdown: one row per method in ``METHODS`` order, one column per task."""
    lines = [
        "| method | kind | trainable params (head included) | "
        + " | ".join(f"{t} ({metric_name(t)})" for t in tasks)
        + " | lr |",
        "|---|---|---|" + "---|" * len(tasks) + "---|",
    ]
    for m in METHODS:
        cells = [summary[t].get(m) for t in tasks]
        if not any(cells):
            continue
        params = next(c["trainable_parameters"] for c in cells if c)
        row = [f"{c['mean']:.1f} ± {c['std']:.1f} (n={c['n']})" if c else "–" for c in cells]
        lr = next(c["lr"] for c in cells if c)
        lines.append(f"| {m} | {method_kind(m)} | {params:,.0f} | " + " | ".join(row) + f" | {lr:g} |")
    return lines


def method_kind(method: str) -> str:
    """``bias``, ``scale``, ``selection`` or ``baseline``."""
    if method in SELECTIONS:
        return "selection"
    if method in BASELINES:
        return "baseline"
    return "scale" if method in SCALING_TYPES else "bias"


def selections_table(summary: dict, tasks: list[str], records: list[dict]) -> list[str]:
    """Markdown: what each selection kept, per seed, against the best single type it could have kept."""
    lines = [
        "| task | selection | selected (seed order) | score | selected type trained alone (same seed) "
        "| best single type it could keep (same seeds) | gap |",
        "|---|---|---|---|---|---|---|",
    ]
    single = _single_scores(records)
    for task in tasks:
        for m in SELECTIONS:
            if m not in summary[task]:
                continue
            c = summary[task][m]
            best = best_single_type(m, c["seeds"], records, task)
            note = f" ({_seed_note(c, best)})" if best and _seed_note(c, best) else ""
            best_text = f"{best['type']} {best['mean']:.1f}{note}{_incomplete(best)}" if best else "–"
            gap = f"{_mean_on(c, best['seeds']) - best['mean']:+.1f}" if best else "–"
            alone = ", ".join(
                f"{single[(task, kept, s)]:.1f}" if (task, kept, s) in single else "–"
                for kept, s in zip(c["selected"], c["seeds"], strict=True)
            )
            lines.append(
                f"| {task} | {m} | {', '.join(c['selected'])} | {c['mean']:.1f} | {alone} | {best_text} | {gap} |"
            )
    return lines


def best_single_type(selection: str, seeds: list[int], records: list[dict], task: str) -> dict | None:
    """The type trained alone that scores best on average, among those ``selection`` could keep.

    Compared on common seeds (seeds differ by more than types do): the selection's ``seeds`` that
    every eligible type has run where there are any (the complete ground truth), else the seeds of
    one type's runs that the most eligible types have all run (more seeds breaking a tie); ``seeds``
    in the result. Types not run on all of them are left out, and ``run``/``eligible`` say how many
    that leaves.
    """
    single = _single_scores(records)
    allowed = eligible_types(selection, records, task)
    covered = {t: [s for s in seeds if (task, t, s) in single] for t in allowed}
    complete = [s for s in seeds if all(s in covered[t] for t in allowed)]

    def types_on(candidate: list[int]) -> int:
        return sum(set(candidate) <= set(run) for run in covered.values())

    common = complete or max((c for c in covered.values() if c), key=lambda c: (types_on(c), len(c)), default=[])
    if not common:
        return None
    means = {
        t: statistics.mean(single[(task, t, s)] for s in common) for t in allowed if set(common) <= set(covered[t])
    }
    best = max(means, key=means.get)
    return {"type": best, "mean": means[best], "run": len(means), "eligible": len(allowed), "seeds": common}


def _mean_on(cell: dict, seeds: list[int]) -> float:
    """A method's mean score over ``seeds`` (all of which it has run)."""
    scores = dict(zip(cell["seeds"], cell["scores"], strict=True))
    return statistics.mean(scores[s] for s in seeds)


def _seed_note(cell: dict, best: dict) -> str:
    """``seeds 0, 1`` where the comparison with ``best`` leaves some of the cell's seeds out, else empty."""
    return "" if best["seeds"] == cell["seeds"] else f"seeds {_seeds(best['seeds'])}"


def _single_scores(records: list[dict]) -> dict:
    """(task, type, seed) -> score x100 of every single-type run."""
    return {(r["task"], r["method"], r["seed"]): 100 * r["score"] for r in records if r["method"] in FAMILY}


def _incomplete(best: dict) -> str:
    return (
        "" if best["run"] == best["eligible"] else f" (of {best['run']}/{best['eligible']} types run on these seeds)"
    )


#: Issue 10's targets that compare a selection with a baseline: (selection, baseline, what it must do).
BASELINE_TARGETS = (
    ("auto_family_0.02%", "peft_beft", "at <= 0.02%: at least as good as peft's BEFT tuner"),
    ("auto_family_0.1%", "bitfit", "at <= 0.1%: at least as good as BitFit"),
)


def targets_table(summary: dict, tasks: list[str], records: list[dict]) -> list[str]:
    """Markdown: each target of the study, per task, met or not, on the seeds both sides have run.

    A target that the runs so far cannot decide says what it lacks instead of "yes".
    """
    lines = ["| task | target | selection | its score | compared with | met |", "|---|---|---|---|---|---|"]
    for task in tasks:
        lines += _best_type_rows(summary[task], task, records) + _baseline_rows(summary[task], task)
        runs = [r for r in records if r["task"] == task and r["method"] in SELECTIONS]
        if runs:
            inert = [r for r in runs if set(r["selected"]) & set(r["inert"])]
            lines.append(
                f"| {task} | never selects an inert type | all selections | {len(runs)} run{'' if len(runs) == 1 else 's'} "
                f"| {len(inert)} kept an inert type | {'no' if inert else 'yes'} |"
            )
    return lines


def _best_type_rows(cells: dict, task: str, records: list[dict]) -> list[str]:
    """Each selection against the best single type it could keep, on the seeds both have run."""
    rows = []
    for m in (m for m in SELECTIONS if m in cells):
        target = f"| {task} | within 1 point of the best single type | {m} | {_cell(cells[m])} "
        best = best_single_type(m, cells[m]["seeds"], records, task)
        if best is None:
            rows.append(target + "| – | not yet (no type run on its seeds) |")
            continue
        gap = _mean_on(cells[m], best["seeds"]) - best["mean"]
        met = "no" if gap < -1 else "yes" if best["run"] == best["eligible"] else f"so far{_incomplete(best)}"
        note = _seed_note(cells[m], best)
        rows.append(
            target + f"| {best['type']} {best['mean']:.1f} (gap {gap:+.1f}{'; ' + note if note else ''}) | {met} |"
        )
    return rows


def _baseline_rows(cells: dict, task: str) -> list[str]:
    """The budgeted selections against the baseline of their size, on the seeds both have run."""
    rows = []
    for m, baseline, target in BASELINE_TARGETS:
        if m not in cells or baseline not in cells:
            continue
        paired = paired_difference(
            *(dict(zip(cells[method]["seeds"], cells[method]["scores"], strict=True)) for method in (m, baseline))
        )
        if paired is None:
            rows.append(f"| {task} | {target} | {m} | {_cell(cells[m])} | {baseline}: no common seed yet | not yet |")
            continue
        seeds, difference = paired.seeds, paired.mean
        per_seed = ""
        if paired.standard_error is not None:
            per_seed = (
                f" ± {paired.standard_error:.1f} s.e.; per seed {', '.join(f'{d:+.1f}' for d in paired.differences)}"
            )
        rows.append(
            f"| {task} | {target} | {m} | {_mean_on(cells[m], seeds):.1f} (seeds {_seeds(seeds)}) "
            f"| {baseline} {_mean_on(cells[baseline], seeds):.1f} (difference {difference:+.1f}{per_seed}) "
            f"| {'yes' if difference >= 0 else 'no'} |"
        )
    return rows


def _seeds(seeds: list[int]) -> str:
    return ", ".join(map(str, seeds))


def eligible_types(selection: str, records: list[dict], task: str) -> list[str]:
    """The candidates of a selection that are not inert and fit its budget (as its runs saw them)."""
    runs = [r for r in records if r["method"] == selection and r["task"] == task]
    options = SELECTIONS[selection]
    budget = options.get("budget")
    allowed = []
    for t, entry in runs[0]["candidate_scores"].items():
        fits = budget is None or entry["parameters"] <= budget * runs[0]["total_parameters"]
        if fits and t not in runs[0]["inert"]:
            allowed.append(t)
    return allowed


def ablation_table(tasks: list[str], records: list[dict], ablation: list[dict]) -> list[str]:
    """Markdown: each method run again with other SelectionConfig or BeftConfig options, against the main grid's runs."""
    lines = [
        "| task | method | options changed | main grid: selected (seed order) | score | changed: selected | score "
        "| difference (same seeds) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task in tasks:
        for m in METHODS:
            # Both sides on their common seeds only: seeds differ by more than the options do.
            runs = [[r for r in side if r["task"] == task and r["method"] == m] for side in (records, ablation)]
            seeds = set.intersection(*({r["seed"] for r in side} for side in runs))
            if not seeds:
                continue
            main, changed = (summarize([r for r in side if r["seed"] in seeds])[task][m] for side in runs)
            options = ", ".join(o for change in _changes(records, ablation, task, m).values() for o in change)
            diff = changed["mean"] - main["mean"]
            lines.append(
                f"| {task} | {m} | {options or '(none)'} | {_selected(main)} | {_cell(main)} | "
                f"{_selected(changed)} | {_cell(changed)} | {diff:+.1f} |"
            )
    return lines


def _selected(cell: dict) -> str:
    return ", ".join(cell["selected"]) if cell["selected"] else "–"


#: BERT's pooler bias: in the head of the papers' code and of beft-trainer before 2026-11-24.
POOLER_BIAS = "bert.pooler.dense.bias"

#: The options an ablation may change: the record's key -> the run's flag, the class whose defaults they override.
OPTION_SETS = {"selection": ("--selection-option", SelectionConfig), "config": ("--config-option", BeftConfig)}


def _changed_options(
    records: list[dict], ablation: list[dict], task: str, method: str, key: str = "selection"
) -> list[str]:
    """``option=value`` (a JSON value) for every option of ``OPTION_SETS[key]`` the ablation runs set differently."""

    def options(runs):
        return next(r.get(key) or {} for r in runs if r["task"] == task and r["method"] == method)

    before, after = options(records), options(ablation)
    defaults = option_defaults(OPTION_SETS[key][1])

    def value(options: dict, key: str):
        return options.get(key, defaults.get(key))

    changed = sorted(k for k in before.keys() | after.keys() if value(before, k) != value(after, k))
    return [f"{k}={json.dumps(value(after, k))}" for k in changed]


def _config_options(runs: list[dict], task: str, method: str) -> tuple[str, ...]:
    """Every ``--config-option`` the runs of ``method`` on ``task`` were made with (one setting per runs file)."""
    config = next((r.get("config") or {} for r in runs if r["task"] == task and r["method"] == method), {})
    return tuple(f"{k}={json.dumps(v)}" for k, v in sorted(config.items()))


def _changes(records: list[dict], ablation: list[dict], task: str, method: str) -> dict[str, tuple[str, ...]]:
    """Every option the ablation runs of ``method`` changed, by the flag that sets it."""
    return {
        flag: tuple(_changed_options(records, ablation, task, method, key)) for key, (flag, _) in OPTION_SETS.items()
    }


def _setting_arguments(opts) -> list[str]:
    """``--steps`` and ``--probe-steps`` where they differ from ``family.py``'s defaults."""
    defaults = build_parser().parse_args(["run", "--model", opts.model])
    return [
        f"--{name.replace('_', '-')} {getattr(opts, name):g}"
        for name in ("steps", "probe_steps")
        if getattr(opts, name) != getattr(defaults, name)
    ]


def _run_command(opts, device: str, records: list[dict]) -> str:
    """How the grid ran: one worker per core on the CPU (a command per ``--config-option`` setting of its
    methods); on a lent GPU, benchmarks/h100.sh's device calls."""
    if device != "cpu":
        return "`bash benchmarks/h100.sh family` (device calls of 14 workers each, resuming the runs file)"
    methods_by_config = _methods_by_config(records)
    base = f"nice python benchmarks/family.py run --model {opts.model}{_grid_arguments(opts, 'run')}"
    if list(methods_by_config) == [()]:
        return f"`{base} --workers 2` (one worker per core)"
    commands = [
        f"`{base} --methods {' '.join(methods)}"
        + (f" --config-option {' '.join(map(shlex.quote, config))}" if config else "")
        + " --workers 2`"
        for config, methods in methods_by_config.items()
    ]
    return ", ".join(commands) + " (one worker per core)"


def _config_note(records: list[dict]) -> list[str]:
    """A paragraph naming the BeftConfig options of the runs that were not made with the defaults."""
    by_config = _methods_by_config(records).items()
    notes = [f"{', '.join(methods)}: `{' '.join(config)}`" for config, methods in by_config if config]
    if not notes:
        return []
    head = (
        " `head_modules` naming BERT's pooler bias is the head of the BEFT/BitFit papers' code and beft-trainer's "
        "default until 2026-11-24 (today's default head is the classifier alone)."
    )
    pooler = any(POOLER_BIAS in ((r.get("config") or {}).get("head_modules") or []) for r in records)
    return [
        f"BeftConfig options of these runs (others: the defaults): {'; '.join(notes)}.{head if pooler else ''}",
        "",
    ]


def _baselines_note(opts, own: list[dict], records: list[dict]) -> list[str]:
    """Which methods' runs come from ``--baselines``."""
    borrowed = [
        m for m in METHODS if any(r["method"] == m for r in records) and not any(r["method"] == m for r in own)
    ]
    if not borrowed:
        return []
    return [f"Runs of {', '.join(borrowed)} (they read no BeftConfig option) from `{_relative(opts.baselines)}`.", ""]


def _methods_by_config(records: list[dict]) -> dict[tuple[str, ...], list[str]]:
    """The grid's methods by the ``--config-option`` options their runs were made with."""
    methods_by_config: dict[tuple[str, ...], list[str]] = {}
    for method in METHODS:
        runs = [r for r in records if r["method"] == method]
        if runs:
            methods_by_config.setdefault(_config_options(runs, runs[0]["task"], method), []).append(method)
    return methods_by_config


def _grid_arguments(opts, mode: str) -> str:
    """The options of this report that differ from ``family.py``'s defaults, as its ``mode`` command takes them."""
    arguments = _setting_arguments(opts)
    for name, default in (("runs", default_runs(opts.model)), ("out", default_out(opts.model))):
        if mode == "report" or name == "runs":
            if Path(getattr(opts, name)).resolve() != default.resolve():
                arguments.append(f"--{name} {_relative(getattr(opts, name))}")
    if mode == "report" and getattr(opts, "baselines", None) is not None:
        arguments.append(f"--baselines {_relative(opts.baselines)}")
    return "".join(f" {a}" for a in arguments)


def _ablation_command(opts, path: Path, records: list[dict], ablation: list[dict]) -> str:
    """The ``family.py run`` lines that made an ablation's runs: the main grid's setting, the options changed.

    One line per set of changed options: a selection whose main-grid options differ from another's
    (the family's score against q/k/v's default) needs its own. Joined by `` && ``.
    """
    methods_by_change: dict[tuple, list[str]] = {}
    for task, method in sorted({(r["task"], r["method"]) for r in ablation}):
        if not any(r["task"] == task and r["method"] == method for r in records):
            continue  # not in the main grid: nothing to compare with
        # The ablation's whole config, not only what changed: its runs cannot rely on the main grid's options.
        config = {"--config-option": _config_options(ablation, task, method)}
        changes = _changes(records, ablation, task, method) | config
        change = tuple(changes.items())
        if method not in methods_by_change.setdefault(change, []):
            methods_by_change[change].append(method)
    setting = "".join(f" {a}" for a in _setting_arguments(opts))
    return " && ".join(
        f"nice python benchmarks/family.py run --model {opts.model}{setting} --runs {_relative(path)} "
        f"--methods {' '.join(sorted(methods))}"
        # quoted: a JSON string's quotes must reach family.py (score="attribution")
        + "".join(f" {flag} {' '.join(map(shlex.quote, options))}" for flag, options in change if options)
        for change, methods in methods_by_change.items()
    )


def _relative(path: Path) -> Path:
    path = Path(path).resolve()
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def _ablation_arguments(paths: list[Path]) -> str:
    return f" --ablation {' '.join(str(_relative(p)) for p in paths)}" if paths else ""


def _cell(cell: dict) -> str:
    return f"{cell['mean']:.1f} ± {cell['std']:.1f} (n={cell['n']})"


def plot(panels: list[tuple[str, str, dict]], path: Path, title: str) -> None:
    """Quality against trainable parameters (log scale), one panel per ``(heading, task, cells)``
    (``cells``: one task of ``summarize``), every method a point."""
    from matplotlib.figure import Figure

    style = {
        "bias": ("o", "#4c72b0"),
        "scale": ("s", "#55a868"),
        "selection": ("*", "#c44e52"),
        "baseline": ("D", "#8c8c8c"),
    }
    fig = Figure(figsize=(7.5 * len(panels), 6.0))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (heading, task, cells) in zip(axes, panels, strict=True):
        for method, cell in cells.items():
            marker, color = style[method_kind(method)]
            size = 14 if marker == "*" else 7
            ax.errorbar(cell["trainable_parameters"], cell["mean"], yerr=cell["std"], fmt=marker, color=color, ms=size)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log scale, head included)")
        ax.set_ylabel(f"{metric_name(task)} x100")
        ax.set_title(heading)
        ax.grid(alpha=0.3)
        for kind, (marker, color) in style.items():
            ax.plot([], [], marker, color=color, label=kind)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    for ax, (_, _, cells) in zip(axes, panels, strict=True):  # after the layout: labels are placed in display units
        singles = sorted((m for m in cells if m in FAMILY), key=lambda m: -cells[m]["mean"])
        # selections first (they get the nearest places); the other single types stay unlabelled: they pile up at one size
        others = sorted((m for m in cells if m not in FAMILY), key=lambda m: method_kind(m) != "selection")
        labelled = others + singles[:3] + singles[3:][-1:]
        place_labels(
            ax,
            [(cells[m]["trainable_parameters"], cells[m]["mean"], m) for m in labelled],
            [
                (c["trainable_parameters"], c["mean"], c["std"], method_kind(m) == "selection")
                for m, c in cells.items()
            ],
        )
    fig.savefig(path, dpi=120)


def figure(specs: list[str], path: Path) -> None:
    """One panel per ``TASK:STEPS:RUNS`` spec, so one figure shows tasks whose grids ran at different lengths."""
    panels, models = figure_panels(specs)
    plot(panels, path, f"{', '.join(sorted(models))}: quality against trainable parameters (mean over seeds run)")


def figure_panels(specs: list[str]) -> tuple[list[tuple[str, str, dict]], set[str]]:
    """``plot``'s panels for ``TASK:STEPS:RUNS[:BASELINES]`` specs, and the models their runs trained."""
    panels, models = [], set()
    for spec in specs:
        task, steps, runs, baselines = parse_panel(spec)
        records = [r for r in read_jsonl(runs) if r["task"] == task and r["steps"] == steps]
        if not records:
            raise SystemExit(f"--panels {spec}: {runs} holds no {task} runs of {steps} steps.")
        models.add(records[0]["model"])
        if baselines is not None:
            shared = shared_baselines(baselines, records, records[0]["model"])
            records += [r for r in shared if r["task"] == task and r["steps"] == steps]
        seeds = sorted({r["seed"] for r in records})
        heading = f"{task}, {steps} steps, seeds {_seeds(seeds)}\n({SINGLES_LABELLED})"
        panels.append((heading, task, summarize(records)[task]))
    return panels, models


def parse_panel(spec: str) -> tuple[str, int, Path, Path | None]:
    """``TASK:STEPS:RUNS[:BASELINES]`` -> (task, steps, runs file, baselines file or None); one line for the rest.

    BASELINES, like ``report --baselines``, gives the methods no BeftConfig option reaches where RUNS has none.
    """
    parts = spec.split(":")
    task, steps, runs, baselines = (parts + [None] * 4)[:4] if len(parts) in (3, 4) else ("", "", "", None)
    if task not in TASKS or not steps.isdigit() or not runs or baselines == "":
        raise SystemExit(
            f"--panels {spec!r}: give TASK:STEPS:RUNS[:BASELINES], e.g. sst2:400:benchmarks/results/x_runs.jsonl "
            f"(tasks: {', '.join(TASKS)})."
        )
    paths = [Path(runs)] + ([Path(baselines)] if baselines else [])
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"--panels {spec}: no runs file {path}.")
    return task, int(steps), paths[0], paths[1] if baselines else None


def place_labels(ax, labels: list[tuple[float, float, str]], markers: list[tuple], size: int = 7) -> None:
    """Write each ``(x, y, text)`` label beside its point, off the markers, their error bars (``markers``:
    ``(x, y, std, large)``) and the labels placed before it.

    A greedy search over offsets (right, left, then further up or down with a thin leader line); a
    label that fits nowhere takes the offset where it overlaps least.
    """
    ax.autoscale_view()
    points_per_pixel = 72 / ax.figure.dpi
    to_display = ax.transData.transform
    frame = ax.get_window_extent()
    taken = []
    for x, y, std, large in markers:
        half = (8 if large else 4) / points_per_pixel
        (px, py), (_, top), (_, bottom) = to_display([(x, y), (x, y + std), (x, y - std)])
        taken += [(px - half, py - half, px + half, py + half), (px - 1, bottom, px + 1, top)]
    height = 1.3 * size / points_per_pixel
    for x, y, text in labels:
        px, py = to_display((x, y))
        width = 0.62 * size * len(text) / points_per_pixel
        best = None
        for dx, dy in _label_offsets(width * points_per_pixel):
            left, bottom = px + dx / points_per_pixel, py + dy / points_per_pixel
            box = (left, bottom, left + width, bottom + height)
            overlap = sum(_overlap(box, other) for other in taken) + _outside(box, frame)
            if best is None or overlap < best[0]:
                best = (overlap, (dx, dy), box)
            if overlap == 0:
                break
        _, (dx, dy), box = best
        taken.append(box)
        far = abs(dy) > 8 or dx < -8 - width * points_per_pixel
        ax.annotate(
            text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=size, va="bottom",
            arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.5"} if far else None,
        )  # fmt: skip


def _label_offsets(width: float) -> list[tuple[float, float]]:
    """Candidate label offsets in points (lower-left corner of the text), nearest first."""
    near = [(6, -4), (6, 4), (6, -12), (-width - 6, -4), (-width - 6, 4), (-width - 6, -12)]
    far = [(dx, dy) for step in range(1, 6) for dy in (12 + 8 * step, -12 - 8 * step) for dx in (12, -width - 12)]
    return near + far


def _overlap(a: tuple, b: tuple) -> float:
    """The area two boxes ``(left, bottom, right, top)`` share."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _outside(box: tuple, frame) -> float:
    """How far a box pokes out of the axes frame, weighted so that spilling out ranks worse than overlapping."""
    spill = max(0.0, frame.x0 - box[0]) + max(0.0, box[2] - frame.x1) + max(0.0, frame.y0 - box[1])
    return 1e3 * (spill + max(0.0, box[3] - frame.y1))


def report(records: list[dict], opts) -> None:
    """Write ``opts.out``.md/.json/.png from the run records."""
    records = [r for r in records if r["steps"] == opts.steps]
    if not records:
        raise SystemExit(f"{opts.runs} holds no runs of {opts.steps} steps yet.")
    own = records
    if opts.baselines is not None:
        records = own + [r for r in shared_baselines(opts.baselines, own, opts.model) if r["steps"] == opts.steps]
    summary = summarize(records)
    tasks = [t for t in TASKS if t in summary]
    ablations = {path: [r for r in read_jsonl(path) if r["steps"] == opts.steps] for path in opts.ablation}
    for path, runs in [(opts.runs, records), *ablations.items()]:
        check_one_setting(runs, path)
    rows = score_analysis(records + [r for runs in ablations.values() for r in runs], opts.probe_steps)
    r0 = records[0]
    setting = (
        f"{r0['steps']} optimizer steps of {r0['batch_size']} (max length {r0['max_length']}), linear decay with "
        f"10% warm-up, AdamW, no weight decay; selection runs probe for {opts.probe_steps} steps, the n candidates at "
        "lr/sqrt(n) (the default), and train k kept types at lr/sqrt(k)"
    )
    lines = [
        f"# The vector family on real data: {opts.model}, low-data GLUE ({r0.get('device', 'cpu')})",
        "",
        f"Hardware: {r0.get('hardware', hardware())}. Setting: {setting}. Scores x100, mean ± std over seeds "
        "(n = seeds run so far), full validation split.",
        "",
        *_config_note(own),
        *_baselines_note(opts, own, records),
        f"Command: {_run_command(opts, r0.get('device', 'cpu'), own)}, then `python benchmarks/family.py report --model "
        f"{opts.model}{_grid_arguments(opts, 'report')}{_ablation_arguments(opts.ablation)}`.",
        "",
        "## Quality per method",
        "",
        *quality_table(summary, tasks),
        "",
        "## Targets",
        "",
        'Issue 10\'s targets, each on the seeds both sides have run; "so far" where not every type the selection '
        "could keep has been trained alone on its seeds yet.",
        "",
        *targets_table(summary, tasks, records),
        "",
        "## What the selections kept",
        "",
        *selections_table(summary, tasks, records),
        "",
        "## Which score picks the type that trains best",
        "",
        "From each selection run's probe (every candidate's scores are stored), per score: the type it ranks "
        "first among the non-inert candidates, compared with the single-type runs of the same task and seed.",
        "",
        *(score_table(rows) if rows else ["(no selection run has its candidates' single-type runs complete yet)"]),
        "",
        "## How far each score separates the smallest types",
        "",
        "A budget that holds one or two types chooses among the candidates of the smallest size (here the "
        "hidden-size vectors). Over each family probe's non-inert candidates of that size (every probe of this "
        "file and its ablations, once per seed): the top value over the median, and std / mean. Adam moves every "
        "vector by about the learning rate per step, so movement (and magnitude) hardly tell them apart.",
        "",
        *separation_table(records + [r for runs in ablations.values() for r in runs]),
    ]
    for path, ablation in ablations.items():
        lines += [
            "",
            f"## Runs with other options ({path.name})",
            "",
            f"Command: `{_ablation_command(opts, path, records, ablation)}`.",
            "",
            *ablation_table(tasks, records, ablation),
        ]
    Path(f"{opts.out}.md").write_text("\n".join(lines) + "\n")
    payload = {"setting": setting, "summary": summary, "score_analysis": rows, "runs": records}
    Path(f"{opts.out}.json").write_text(json.dumps(payload, indent=1))
    panels = [(f"{task} ({SINGLES_LABELLED})", task, summary[task]) for task in tasks]
    plot(panels, Path(f"{opts.out}.png"), f"{opts.model}: quality against trainable parameters")
    print(Path(f"{opts.out}.md").read_text())
