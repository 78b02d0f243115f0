"""The family study: its workers share one grid (a job runs once, a dead worker's claim is void); its plot is legible."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # family.py imports its sibling common.py
spec = importlib.util.spec_from_file_location("benchmarks_family", os.path.join(ROOT, "benchmarks", "family.py"))
family = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = family
spec.loader.exec_module(family)
sys.modules.setdefault("family", family)  # family_report imports its sibling by name
import family_report  # noqa: E402

KEY = ("minilm", "sst2", "v", 0, 0.01, 400)


def _write_claim(runs, pid, started):
    with open(f"{runs}.claims", "a") as f:
        f.write(json.dumps({"key": list(KEY), "pid": pid, "started": started}) + "\n")


def test_a_job_is_claimed_once_while_its_worker_runs(tmp_path):
    runs = tmp_path / "runs.jsonl"
    assert family.claim(runs, KEY)
    assert not family.claim(runs, KEY)  # this process holds it
    assert family.claim(runs, (*KEY[:3], 1, *KEY[4:]))  # another seed is another job


def test_a_finished_job_is_never_claimed_again(tmp_path):
    runs = tmp_path / "runs.jsonl"
    record = dict(zip(("model", "task", "method", "seed", "lr", "steps"), KEY, strict=True))
    runs.write_text(json.dumps(record) + "\n")
    assert not family.claim(runs, KEY)


def test_the_claim_of_a_worker_that_ended_is_void(tmp_path):
    runs = tmp_path / "runs.jsonl"
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    _write_claim(runs, ended.pid, "1")
    assert family.claim(runs, KEY)


def test_a_pid_reused_by_another_process_does_not_hold_the_claim(tmp_path):
    runs = tmp_path / "runs.jsonl"
    started = family._start_time(os.getpid())
    assert started is not None
    _write_claim(runs, os.getpid(), str(int(started) - 1))  # this pid, but an earlier process
    assert family.claim(runs, KEY)


def test_the_plot_labels_of_clustered_points_do_not_overlap():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    ax = Figure(figsize=(6, 4)).subplots()
    points = [(3458, 76.0 + 0.05 * i, f"method_{i}") for i in range(6)] + [
        (10370, 79.5, "mlp_in"),
        (21890, 79.9, "auto"),
    ]
    for x, y, _ in points:
        ax.plot(x, y, "o")
    ax.set_xscale("log")
    family_report.place_labels(ax, points, [(x, y, 0.5, False) for x, y, _ in points])
    canvas = FigureCanvasAgg(ax.figure)
    canvas.draw()  # places the annotations; Text's own extent leaves their leader lines out
    boxes = [Text.get_window_extent(text, canvas.get_renderer()) for text in ax.texts]
    assert [text.get_text() for text in ax.texts] == [text for _, _, text in points]
    assert not [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :] if a.overlaps(b)]


def test_the_score_analysis_ranks_all_candidates_and_those_that_fit_the_small_budget():
    attribution = {"q": 3.0, "v": 2.0, "mlp_in": 5.0, "attn_out": 1.0}
    sizes = {"q": 100, "v": 100, "mlp_in": 400, "attn_out": 100}  # 0.02% of 1e6 = 200: mlp_in does not fit
    trained = {"q": 0.80, "v": 0.85, "mlp_in": 0.90, "attn_out": 0.70}
    scores = {
        t: {s: attribution[t] for s in ("projection", "magnitude", "fisher", "attribution", "random")} for t in sizes
    }
    probe = _family_probe("auto_family_0.1%", scores, sizes)
    singles = [{"task": "sst2", "seed": 0, "method": t, "score": trained[t]} for t in trained]
    rows = {(r["run"], r["score"]): r for r in family_report.score_analysis([probe, *singles], probe_steps=40)}
    everything = rows[("family of 19", "attribution")]
    assert (everything["picked"], everything["best"], everything["gap"]) == ("mlp_in", "mlp_in", 0.0)
    small = rows[("family of 19: the 3 that fit 0.02%", "attribution")]
    assert (small["picked"], small["best"], round(small["gap"], 6), small["rho"]) == ("q", "v", 5.0, 0.5)
    assert not [run for run, _ in rows if "0.1%" in run]  # every type fits 0.1%: nothing to restrict


def test_the_types_that_fit_the_small_budget_are_ranked_before_the_larger_ones_are_trained_alone():
    sizes = {"q": 100, "v": 100, "attn_out": 100, "mlp_in": 400}  # 0.02% of 1e6 = 200: mlp_in does not fit
    attribution = {"q": 3.0, "v": 2.0, "attn_out": 1.0, "mlp_in": 5.0}
    scores = {t: {s: attribution[t] for s in family_report.SCORES if "_" not in s} for t in sizes}
    probe = _family_probe("auto_family_0.02%", scores, sizes)
    singles = [_run(t, 0, score) for t, score in (("q", 70.0), ("v", 75.0))]  # attn_out and mlp_in: not yet
    assert family_report.score_analysis([probe, *singles], probe_steps=40) == []
    rows = family_report.score_analysis([probe, *singles, _run("attn_out", 0, 60.0)], probe_steps=40)
    assert {r["run"] for r in rows} == {"family of 19: the 3 that fit 0.02%"}
    attribution_row = next(r for r in rows if r["score"] == "attribution")
    assert (attribution_row["picked"], attribution_row["best"], attribution_row["gap"]) == ("q", "v", 5.0)


def test_a_probe_is_compared_with_the_types_trained_alone_with_its_own_head():
    attribution = {"q": 2.0, "v": 1.0}
    probe = {"task": "sst2", "seed": 0, "method": "auto_qkv", "inert": [], "selection": {}, "probe_steps": 40}
    names = ("projection", "magnitude", "fisher", "attribution", "random")
    scores = {t: dict.fromkeys(names, a) | {"parameters": 10} for t, a in attribution.items()}
    probe |= {"total_parameters": 1_000, "candidate_scores": scores}
    with_pooler = probe | {"config": PAPER_HEAD}
    singles = [
        {"task": "sst2", "seed": 0, "method": t, "score": score, "config": config}
        for config, scores in ((PAPER_HEAD, {"q": 0.7, "v": 0.8}), (None, {"q": 0.9, "v": 0.6}))
        for t, score in scores.items()
    ]
    rows = family_report.score_analysis([with_pooler, probe, *singles], probe_steps=40)
    best = [(r["best"], r["gap"]) for r in rows if r["score"] == "attribution"]
    assert [(b, round(g, 6)) for b, g in best] == [("v", 10.0), ("q", 0.0)]  # one row per probe, each its own truth


def test_the_separation_table_measures_the_spread_among_the_smallest_types_once_per_probe():
    movement = {"q": 10.0, "v": 11.0, "attn_out": 9.0, "mlp_in": 99.0}  # mlp_in is larger: left out
    attribution = {"q": 1.0, "v": 8.0, "attn_out": 2.0, "mlp_in": 50.0}
    sizes = {"q": 100, "v": 100, "attn_out": 100, "mlp_in": 400, "k": 100}
    scores = {t: {"movement": movement.get(t, 0.0), "attribution": attribution.get(t, 0.0)} for t in sizes}
    for entry in scores.values():
        entry |= {s: 1.0 for s in ("projection", "magnitude", "fisher", "random")}
    probe = {"task": "sst2", "seed": 0, "method": "auto_family_0.1%", "inert": ["k"], "probe_steps": 40}
    probe |= {"selection": {}, "candidate_scores": {t: scores[t] | {"parameters": sizes[t]} for t in sizes}}
    same_probe = probe | {"method": "auto_family_0.02%", "selection": {"budget": 0.0002}}
    table = family_report.separation_table([probe, same_probe])[2:]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in table}
    assert rows["movement"] == ["1", "1.10", "0.08 |"]  # 11 over 10; std 0.816 / mean 10
    assert rows["attribution"] == ["1", "4.00", "0.84 |"]  # 8 over 2; std 3.09 / mean 3.67
    assert rows["magnitude"] == ["1", "1.00", "0.00 |"]


def _family_probe(method, scores, sizes):
    """A family selection run of 1e6 parameters on SST-2 seed 0, with each candidate's ``scores`` and size."""
    probe = {"task": "sst2", "seed": 0, "method": method, "inert": [], "selection": {}, "probe_steps": 40}
    return probe | {
        "total_parameters": 1_000_000,
        "candidate_scores": {t: scores[t] | {"parameters": sizes[t]} for t in sizes},
    }


def _run(method, seed, score, **fields):
    record = {"task": "sst2", "method": method, "seed": seed, "score": score / 100, "lr": 0.01}
    return record | {"trainable_parameters": 100, "selected": [], "inert": []} | fields


def test_the_targets_compare_on_common_seeds_and_say_what_they_cannot_decide_yet():
    sizes = {"q": 100, "k": 100, "v": 100, "mlp_in": 400}  # 0.02% of 1e6 = 200: mlp_in does not fit
    probe = {"candidate_scores": {t: {"parameters": n} for t, n in sizes.items()}, "total_parameters": 1_000_000}
    records = [
        _run("auto_family_0.02%", 0, 80.0, selected=["v"], inert=["k"], **probe),
        _run("auto_family_0.02%", 1, 78.0, selected=["k"], inert=["k"], **probe),  # kept an inert type
        _run("q", 0, 82.0),
        _run("q", 1, 80.0),  # q: 81.0 on seeds 0-1, beats the selection's 79.0 by 2 points
        _run("v", 0, 79.0),  # v lacks seed 1: the family selections are compared where every type ran, seed 0
        _run("peft_beft", 0, 76.0),
        _run("peft_beft", 1, 77.0),
        _run("peft_beft", 2, 90.0),  # seed 2: the selection has not run it, so it does not count
        _run("auto_qkv", 1, 79.5, selected=["q"], inert=["k"], candidate_scores={"q": {}, "k": {}, "v": {}}),
        *(
            _run("auto_family_0.1%", s, x, selected=["q"], inert=["k"], **probe)
            for s, x in ((0, 85.0), (1, 83.0), (2, 70.0))
        ),
        _run("mlp_in", 0, 84.0),
        _run("mlp_in", 1, 84.0),
    ]
    summary = family_report.summarize(records)
    rows = [line.split(" | ") for line in family_report.targets_table(summary, ["sst2"], records)[2:]]
    met = {(row[1], row[2]): (row[4], row[5].rstrip(" |")) for row in rows}
    assert met[("within 1 point of the best single type", "auto_family_0.02%")] == ("q 82.0 (gap -2.0; seeds 0)", "no")
    # no seed that every type has run: the most seeds some type has run (seed 1, q alone), not decided yet
    assert met[("within 1 point of the best single type", "auto_qkv")] == (
        "q 80.0 (gap -0.5)",
        "so far (of 1/2 types run on these seeds)",
    )
    # seed 0, where q, v and mlp_in all ran, decides: mlp_in's seed 1 would leave v out
    assert met[("within 1 point of the best single type", "auto_family_0.1%")] == (
        "mlp_in 84.0 (gap +1.0; seeds 0)",
        "yes",
    )
    assert met[("at <= 0.02%: at least as good as peft's BEFT tuner", "auto_family_0.02%")] == (
        "peft_beft 76.5 (difference +2.5 ± 1.5 s.e.; per seed +4.0, +1.0)",  # s.e. = stdev(4, 1) / sqrt(2)
        "yes",
    )
    assert met[("never selects an inert type", "all selections")] == ("1 kept an inert type", "no")


def test_the_report_names_the_options_its_runs_were_made_with(tmp_path):
    opts = family.build_parser().parse_args(["report", "--steps", "1000", "--probe-steps", "100"])
    opts.runs, opts.out = tmp_path / "runs.jsonl", family.default_out("minilm")
    run, report = (family_report._grid_arguments(opts, mode) for mode in ("run", "report"))
    assert run == f" --steps 1000 --probe-steps 100 --runs {tmp_path / 'runs.jsonl'}"
    assert report == run  # the default --out is left out
    opts.steps, opts.probe_steps, opts.runs = 400, 40, family.default_runs("minilm")
    assert family_report._grid_arguments(opts, "report") == ""


def test_an_ablation_command_repeats_the_main_grid_setting_and_names_what_it_changed(tmp_path):
    opts = family.build_parser().parse_args(["report", "--steps", "1000", "--probe-steps", "100"])
    main = [{"task": "cola", "method": "auto_family_0.02%", "selection": {"budget": 0.0002, "score": "movement"}}]
    changed = [
        {
            "task": "cola",
            "method": "auto_family_0.02%",
            "selection": {"budget": 0.0002, "probe_steps": 200, "score": "attribution"},
        }
    ]
    command = family_report._ablation_command(opts, tmp_path / "abl.jsonl", main, changed)
    assert command == (
        f"nice python benchmarks/family.py run --model minilm --steps 1000 --probe-steps 100 --runs "
        f"{tmp_path / 'abl.jsonl'} --methods auto_family_0.02% --selection-option probe_steps=200 "
        """'score="attribution"'"""
    )
    # what the shell passes on parses back to the changed options (the JSON string keeps its quotes)
    arguments = shlex.split(command)[3:]
    parsed = family.build_parser().parse_args(arguments)
    assert family.parse_selection_options(parsed.selection_option) == {"probe_steps": 200, "score": "attribution"}


def test_a_figure_takes_each_panel_from_its_own_runs_file_and_length(tmp_path):
    short, long = tmp_path / "short.jsonl", tmp_path / "long.jsonl"
    for path, task, steps in ((short, "sst2", 400), (long, "cola", 1000)):
        records = [_run(m, 0, 70.0, task=task, steps=steps, model="minilm") for m in ("v", "bitfit")]
        records.append(_run("v", 1, 60.0, task=task, steps=steps + 1, model="minilm"))  # another length: left out
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "lead"
    panels, models = family_report.figure_panels([f"sst2:400:{short}", f"cola:1000:{long}"])
    assert [(task, heading.split("\n")[0]) for heading, task, _ in panels] == [
        ("sst2", "sst2, 400 steps, seeds 0"),
        ("cola", "cola, 1000 steps, seeds 0"),
    ]
    assert [cells["v"]["mean"] for _, _, cells in panels] == [70.0, 70.0] and models == {"minilm"}
    family.main(["figure", "--panels", f"sst2:400:{short}", f"cola:1000:{long}", "--out", str(out)])
    assert (tmp_path / "lead.png").stat().st_size > 10_000
    with pytest.raises(SystemExit, match="holds no rte runs of 400 steps"):
        family.main(["figure", "--panels", f"rte:400:{short}", "--out", str(out)])
    with pytest.raises(SystemExit, match="give TASK:STEPS:RUNS"):
        family.main(["figure", "--panels", f"sst2:{short}", "--out", str(out)])
    with pytest.raises(SystemExit, match="and --out PREFIX"):
        family.main(["figure", "--panels", f"sst2:400:{short}"])


def test_a_figure_panel_takes_the_methods_no_config_option_reaches_from_its_baselines_file(tmp_path):
    own, other = tmp_path / "head_runs.jsonl", tmp_path / "papers_head_runs.jsonl"
    own.write_text(json.dumps(_run("v", 0, 77.0, model="minilm", steps=400)) + "\n")
    rows = [_run(m, 0, 60.0, model="minilm", steps=400) for m in ("v", "peft_beft", "lora")]
    rows += [_run("full", 0, 80.0, model="minilm", steps=1000), _run("full", 0, 81.0, model="minilm", task="cola")]
    other.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ((_, _, cells),), _ = family_report.figure_panels([f"sst2:400:{own}:{other}"])
    # v reads the head: its own run, not the other grid's; full ran another length or task there.
    assert {m: c["mean"] for m, c in cells.items()} == {"v": 77.0, "peft_beft": 60.0, "lora": 60.0}
    for spec, message in (
        (f"sst2:400:{own}:{tmp_path / 'missing.jsonl'}", "no runs file"),
        (f"sst2:400:{own}:{other}:{other}", "give TASK:STEPS:RUNS"),
        (f"sst2:400:{own}:", "give TASK:STEPS:RUNS"),
    ):
        with pytest.raises(SystemExit, match=message):
            family_report.figure_panels([spec])


def test_a_family_probe_ranks_its_bias_types_before_its_scaling_vectors_are_trained_alone():
    sizes = {"q": 100, "v": 100, "mlp_in": 400, "v_scale_in": 100}
    attribution = {"q": 1.0, "v": 3.0, "mlp_in": 2.0, "v_scale_in": 4.0}
    scores = {t: {s: attribution[t] for s in family_report.SCORES if "_" not in s} for t in sizes}
    probe = _family_probe("auto_family_0.1%", scores, sizes)
    singles = [_run(t, 0, score) for t, score in (("q", 70.0), ("v", 75.0), ("mlp_in", 80.0))]  # v_scale_in: not yet
    rows = family_report.score_analysis([probe, *singles], probe_steps=40)
    assert {r["run"] for r in rows} == {"family of 19: its 3 bias types"}
    attribution_row = next(r for r in rows if r["score"] == "attribution")
    assert (attribution_row["picked"], attribution_row["best"], attribution_row["gap"]) == ("v", "mlp_in", 5.0)


def test_selections_whose_options_changed_differently_get_a_command_each(tmp_path):
    opts = family.build_parser().parse_args(["report"])
    qkv, family_budget = {"candidates": ["q", "k", "v"]}, {"budget": 0.001, "score": "movement"}
    main = [
        {"task": "sst2", "method": "auto_qkv", "selection": qkv},
        {"task": "sst2", "method": "auto_family_0.1%", "selection": family_budget},
    ]
    full_rate = {"scale_probe_learning_rate": False}
    ablation = [
        {"task": "sst2", "method": "auto_qkv", "selection": qkv | full_rate},
        {
            "task": "sst2",
            "method": "auto_family_0.1%",
            "selection": family_budget | full_rate | {"score": "attribution"},
        },
        {"task": "sst2", "method": "auto_family_0.02%", "selection": full_rate},  # not in the main grid
    ]
    commands = family_report._ablation_command(opts, tmp_path / "abl.jsonl", main, ablation).split(" && ")
    assert [c.split(" --methods ")[1] for c in commands] == [
        "auto_family_0.1% --selection-option scale_probe_learning_rate=false 'score=\"attribution\"'",
        "auto_qkv --selection-option scale_probe_learning_rate=false",
    ]
    # an option the main grid left at its default is not a change when the ablation spells the default out
    spelled_out = [{"task": "sst2", "method": "auto_qkv", "selection": qkv | {"scale_probe_learning_rate": True}}]
    assert family_report._changed_options(main, spelled_out, "sst2", "auto_qkv") == []


def test_an_ablation_is_compared_on_the_seeds_both_sides_have_run():
    main = [_run("auto_family_0.02%", 0, 88.0, selected=["q_scale_in"], selection={"score": "movement"})]
    ablation = [
        _run("auto_family_0.02%", seed, score, selected=["v"], selection={"score": "attribution"})
        for seed, score in ((0, 91.0), (1, 89.0))  # seed 1: the main grid has not run it
    ]
    row = family_report.ablation_table(["sst2"], main, ablation)[2].split(" | ")
    assert (row[4], row[6], row[7]) == ("88.0 ± 0.0 (n=1)", "91.0 ± 0.0 (n=1)", "+3.0 |")


def test_config_options_reach_the_librarys_methods_and_are_refused_elsewhere_in_one_line(tmp_path):
    from helpers import tiny_model, training_args

    paper_head = 'head_modules=["classifier", "bert.pooler.dense.bias"]'
    opts = family.build_parser().parse_args(["run", "--methods", "v", "--config-option", paper_head])
    opts.config_option = family.parse_config_options(opts.config_option, opts.methods)
    trainer = family.build_trainer("v", tiny_model("bert"), training_args(tmp_path), opts)
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    value_biases = {f"bert.encoder.layer.{i}.attention.self.value.bias" for i in (0, 1)}
    assert trained == value_biases | {"classifier.weight", "classifier.bias", "bert.pooler.dense.bias"}
    for items, methods, message in (
        (['head_modules=["classifier"]'], ["v", "lora"], "lora do not read BeftConfig"),
        (["bias_types=v"], ["v"], "OPTION among head_modules"),  # --methods says what trains
        (["train_head=yes"], ["v"], "the value must be JSON"),
        (['train_head="yes"'], ["v"], "train_head"),  # BeftConfig's own check, before any run
    ):
        with pytest.raises(SystemExit, match=message):
            family.parse_config_options(items, methods)


def test_a_single_type_run_again_with_a_config_option_is_compared_and_its_command_repeats_it(tmp_path):
    main = [_run("v", seed, score) for seed, score in ((0, 76.0), (1, 75.0))]
    ablation = [_run("v", 0, 77.5, config={"head_modules": ["classifier"]})]
    row = family_report.ablation_table(["sst2"], main, ablation)[2].split(" | ")
    assert row[1:] == ["v", 'head_modules=["classifier"]', "–", "76.0 ± 0.0 (n=1)", "–", "77.5 ± 0.0 (n=1)", "+1.5 |"]
    opts = family.build_parser().parse_args(["report"])
    command = family_report._ablation_command(opts, tmp_path / "abl.jsonl", main, ablation)
    assert command.endswith("--methods v --config-option 'head_modules=[\"classifier\"]'")
    parsed = family.build_parser().parse_args(shlex.split(command)[3:])
    assert family.parse_config_options(parsed.config_option, parsed.methods) == {"head_modules": ["classifier"]}


def test_the_best_single_type_is_found_on_seeds_every_type_ran_even_when_they_ran_different_seeds():
    probe = {"candidate_scores": {"q": {"parameters": 100}, "v": {"parameters": 100}}, "total_parameters": 10**6}
    records = [
        *(_run("auto_family_0.1%", s, 80.0, selected=["q"], **probe) for s in (0, 1, 2)),
        *(_run("q", s, x) for s, x in ((0, 70.0), (1, 90.0))),
        *(_run("v", s, x) for s, x in ((0, 75.0), (2, 60.0))),  # as many seeds as q, another one
    ]
    best = family_report.best_single_type("auto_family_0.1%", [0, 1, 2], records, "sst2")
    assert best == {"type": "v", "mean": 75.0, "run": 2, "eligible": 2, "seeds": [0]}


def test_the_best_single_type_is_found_on_the_seeds_most_types_ran_before_more_seeds_of_fewer_types():
    probe = {"candidate_scores": {t: {"parameters": 100} for t in ("q", "k", "v")}, "total_parameters": 10**6}
    records = [
        *(_run("auto_family_0.1%", s, 80.0, selected=["q"], **probe) for s in (0, 1, 2)),
        *(_run("v", s, x) for s, x in ((0, 75.0), (1, 76.0), (2, 77.0))),
        *(_run("q", s, x) for s, x in ((0, 79.0), (1, 81.0))),  # the best type, not yet run on seed 2
    ]
    best = family_report.best_single_type("auto_family_0.1%", [0, 1, 2], records, "sst2")
    assert best == {"type": "q", "mean": 80.0, "run": 2, "eligible": 3, "seeds": [0, 1]}  # k: none run yet


PAPER_HEAD = {"head_modules": ["classifier", "bert.pooler.dense.bias"]}


def test_a_runs_file_holds_one_setting_per_method_and_the_grid_refuses_to_mix_in_another(tmp_path):
    runs = tmp_path / "runs.jsonl"
    old = _run("v", 0, 76.0, model="minilm", steps=400, config=PAPER_HEAD, selection=None)
    runs.write_text(json.dumps(old) + "\n")

    def grid(*options):
        opts = family.build_parser().parse_args(["run", "--methods", "v", "--runs", str(runs), *options])
        opts.config_option = family.parse_config_options(opts.config_option, opts.methods)
        return opts

    family.check_runs_setting(grid("--config-option", json_option(PAPER_HEAD)))  # the file's setting: runs on
    with pytest.raises(SystemExit, match=r"v on sst2 \(400 steps\) with .*config\": \{\}.* one setting per runs file"):
        family.main(["run", "--methods", "v", "--runs", str(runs)])  # today's default head: refused before any run
    spelled_out = old | {"seed": 1, "selection": {"scale_probe_learning_rate": True}}  # a default: the same setting
    family.check_one_setting([old, spelled_out], runs)
    mixed = [old, old | {"seed": 1, "config": None}]
    with pytest.raises(SystemExit, match="one setting per runs file"):
        family_report.report(mixed, family.build_parser().parse_args(["report", "--runs", str(runs)]))


def json_option(config: dict) -> str:
    return "".join(f"{k}={json.dumps(v)}" for k, v in config.items())


def test_the_grid_command_repeats_each_methods_config_options(tmp_path):
    records = [_run("v", 0, 76.0, config=PAPER_HEAD), _run("lora", 0, 80.0, config=None)]
    opts = family.build_parser().parse_args(["report"])
    opts.runs, opts.out = family.default_runs("minilm"), family.default_out("minilm")  # as main() sets them
    command = family_report._run_command(opts, "cpu", records)
    v_command, lora_command = (c.strip("`") for c in command.removesuffix(" (one worker per core)").split("`, `"))
    assert lora_command.endswith("--methods lora --workers 2")
    parsed = family.build_parser().parse_args(shlex.split(v_command)[3:])
    assert parsed.methods == ["v"] and family.parse_config_options(parsed.config_option, parsed.methods) == PAPER_HEAD
    note = family_report._config_note(records)[0]
    assert note.startswith('BeftConfig options of these runs (others: the defaults): v: `head_modules=["classifier",')
    assert "default until 2026-11-24" in note
    assert family_report._config_note([_run("lora", 0, 80.0)]) == []


def test_an_ablation_back_to_a_default_names_it_and_its_command_carries_its_whole_config(tmp_path):
    main = [_run("v", 0, 76.0, config=PAPER_HEAD)]
    default_head = [_run("v", 0, 77.0, config=None)]
    assert family_report._changes(main, default_head, "sst2", "v")["--config-option"] == ("head_modules=null",)
    other_score = [_run("auto_family_0.02%", 0, 77.0, config=PAPER_HEAD, selection={"score": "movement"})]
    main.append(_run("auto_family_0.02%", 0, 76.0, config=PAPER_HEAD, selection={"score": "attribution"}))
    opts = family.build_parser().parse_args(["report"])
    command = family_report._ablation_command(opts, tmp_path / "abl.jsonl", main, other_score)
    parsed = family.build_parser().parse_args(shlex.split(command)[3:])
    assert family.parse_config_options(parsed.config_option, parsed.methods) == PAPER_HEAD  # unchanged, still repeated
    assert family.parse_selection_options(parsed.selection_option) == {"score": "movement"}


def test_baselines_come_from_another_grid_only_for_methods_no_config_option_reaches(tmp_path):
    other = tmp_path / "papers_head_runs.jsonl"
    rows = [
        _run(method, 0, 70.0, model="minilm", config=config)
        for method, config in (("peft_beft", None), ("lora", None), ("v", PAPER_HEAD), ("bitfit", PAPER_HEAD))
    ]
    other.write_text("".join(json.dumps(r) + "\n" for r in rows))
    own = [_run("v", 0, 77.0, model="minilm"), _run("lora", 0, 80.0, model="minilm")]
    borrowed = family.shared_baselines(other, own, "minilm")
    assert [r["method"] for r in borrowed] == ["peft_beft"]  # v and bitfit read the head; lora is run here
    assert family.shared_baselines(other, own, "mpnet") == []
    with pytest.raises(SystemExit, match="no runs there"):
        family.shared_baselines(tmp_path / "missing.jsonl", own, "minilm")
    opts = family.build_parser().parse_args(["report", "--baselines", str(other)])
    opts.runs, opts.out = family.default_runs("minilm"), family.default_out("minilm")
    assert family_report._grid_arguments(opts, "report").endswith(f"--baselines {other}")
    note = family_report._baselines_note(opts, own, own + borrowed)
    assert note[0] == f"Runs of peft_beft (they read no BeftConfig option) from `{other}`."
