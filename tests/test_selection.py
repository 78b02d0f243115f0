"""The selection callback in one process: exact freeze, rewind, inert types, accumulation, resume."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from exactness import assert_exact_selection_run, load_runs
from helpers import AtSwitch, TokenDataset, assert_frozen_after_switch, snapshot, tiny_bert, tiny_model, training_args
from scripts.exactness_run import run
from transformers import TrainerCallback

from beft_trainer import REPORT_NAME, BeftConfig, BeftConfigError, BeftTrainer, BiasSelectionCallback


def test_switch_freezes_exactly_and_rewinds(tmp_path):
    run(str(tmp_path), probe_steps=4, max_steps=10)
    assert_exact_selection_run(str(tmp_path), world_size=1)


def test_report_has_every_score_for_every_candidate(tmp_path):
    run(str(tmp_path), probe_steps=4, max_steps=10)
    with open(tmp_path / REPORT_NAME) as f:
        report = json.load(f)
    assert report["selected"] == load_runs(str(tmp_path))[0][0]["selected"]
    assert report["score"] == "projection" and report["probe_steps"] == 4 and report["step"] == 4
    for bias_type in ("q", "k", "v"):
        entry = report["scores"][bias_type]
        for score in ("projection", "magnitude", "fisher", "attribution", "random"):
            assert isinstance(entry[score], float)
            assert list(entry["per_layer"][score]) == ["0", "1"]
    counts = report["trainable_parameters"]
    # q, k, v biases (3 x 2 x 16) + classifier (2x16 + 2) before; one type after. The pooler bias is
    # the backbone's: frozen.
    assert counts == {"before": 130, "after": 66, "total": 6354}


def test_key_bias_is_inert_and_never_selected(tmp_path):
    run(str(tmp_path), probe_steps=4, max_steps=6)
    report = load_runs(str(tmp_path))[0][0]["report"]
    assert "k" in report["inert"] and "rounding noise" in report["inert"]["k"]
    assert report["selected"] != ["k"]
    fisher = {t: report["scores"][t]["fisher"] for t in ("q", "k", "v")}
    assert fisher["k"] < 1e-6 * fisher["v"]


@pytest.mark.parametrize(
    ("model_type", "key_is_inert"),
    [("bert", True), ("opt", True), ("gpt2", True), ("qwen2", False), ("llama", False)],
)
def test_inert_types_come_from_gradients_not_names(model_type, key_is_inert, tmp_path):
    # Absolute positions (BERT, OPT, GPT-2) make b_k a shift of each softmax row: it cannot change
    # the output. Rotary positions (Qwen2, Llama with added biases) rotate it per key: it can, even
    # where its gradient is small. The criterion is the gradient's coherence against rounding
    # (tests/test_inert.py), never a fraction of the strongest type's Fisher mass.
    selection = BiasSelectionCallback(probe_steps=3, score="magnitude")
    model = tiny_model(model_type, initializer_range=0.2)
    trainer = BeftTrainer(
        model,
        training_args(tmp_path, max_steps=4),
        beft_config=BeftConfig(add_missing_biases=model_type == "llama"),
        train_dataset=TokenDataset(),
        callbacks=[selection],
    )
    trainer.train()
    assert sorted(selection.report.inert) == (["k"] if key_is_inert else []), selection.report.inert
    if key_is_inert:
        assert "coherence" in selection.report.inert["k"] and selection.report.selected != ["k"]


def test_the_projection_score_over_added_zero_biases_is_refused_before_any_step(tmp_path):
    # Every vector that moves from zero scores exactly 1: the candidates' order would decide.
    trainer = BeftTrainer(
        tiny_model("llama"),
        training_args(tmp_path, max_steps=4),
        beft_config=BeftConfig(add_missing_biases=True),
        train_dataset=TokenDataset(),
        callbacks=[BiasSelectionCallback(probe_steps=2)],
    )
    with pytest.raises(BeftConfigError, match="projection score cannot rank q, k, v: some of their pretrained"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_inert_types_are_reported_when_exclude_inert_lets_them_compete(tmp_path):
    selection = BiasSelectionCallback(probe_steps=3, exclude_inert=False, inert_threshold=1e-3)
    BeftTrainer(
        tiny_bert(), training_args(tmp_path, max_steps=4), train_dataset=TokenDataset(), callbacks=[selection]
    ).train()
    assert list(selection.report.inert) == ["k"] and "floor 1.0e-03" in selection.report.inert["k"]


def test_probe_steps_count_optimizer_steps_under_gradient_accumulation(tmp_path):
    run(str(tmp_path), probe_steps=3, max_steps=6, grad_accum=2)
    record = load_runs(str(tmp_path))[0][0]
    assert record["report"]["step"] == 3 and record["global_step"] == 6
    assert_exact_selection_run(str(tmp_path), world_size=1)


@pytest.mark.parametrize("score", ["magnitude", "movement", "fisher", "attribution", "random"])
def test_every_score_decides_when_asked(score, tmp_path):
    selection = BiasSelectionCallback(probe_steps=3, score=score, top_k=2, rewind=False)
    trainer = BeftTrainer(
        tiny_bert(), training_args(tmp_path, max_steps=5), train_dataset=TokenDataset(), callbacks=[selection]
    )
    trainer.train()
    report = selection.report
    eligible = [t for t in ("q", "k", "v") if t not in report.inert]
    expected = sorted(eligible, key=lambda t: -report.scores[t][score])[:2]
    assert selection.selected == expected
    assert trainer.frozen_groups == [t for t in ("q", "k", "v") if t not in expected]


def test_without_rewind_frozen_types_keep_their_probed_values(tmp_path):
    model = tiny_bert()
    pretrained = snapshot(model)
    selection = BiasSelectionCallback(probe_steps=3, rewind=False, exclude_inert=False, score="magnitude")
    trainer = BeftTrainer(
        model, training_args(tmp_path, max_steps=5), train_dataset=TokenDataset(), callbacks=[selection]
    )
    trainer.train()
    frozen = trainer.bias_layout.names(trainer.frozen_groups)
    assert any(not torch.equal(pretrained[n], dict(model.named_parameters())[n]) for n in frozen)


def _resumable_trainer(output_dir, probe_steps=4, max_steps=10, **options):
    args = training_args(
        output_dir, max_steps=max_steps, save_strategy="steps", save_steps=2, per_device_train_batch_size=4
    )
    selection = BiasSelectionCallback(probe_steps=probe_steps, **options)
    trainer = BeftTrainer(tiny_bert(), args, train_dataset=TokenDataset(), callbacks=[selection])
    return trainer, selection


#: A budget for two of the tiny model's 32-parameter types: its default score is settled at train begin.
SMALL_BUDGET = {
    "candidates": ("v", "attn_out", "v_scale_in", "mlp_out_scale_in"),
    "budget": 70,
    "exclude_inert": False,
}


@pytest.mark.parametrize("options", [{}, SMALL_BUDGET], ids=["qkv", "small-budget"])
@pytest.mark.parametrize("checkpoint_step", [2, 6], ids=["during-probing", "after-switch"])
def test_resume_gives_the_same_selection_and_frozen_set(checkpoint_step, options, tmp_path):
    reference, reference_selection = _resumable_trainer(tmp_path / "reference", **options)
    reference.train()
    expected = snapshot(reference.model)

    resumed, selection = _resumable_trainer(tmp_path / "reference", **options)
    resumed.train(resume_from_checkpoint=str(tmp_path / "reference" / f"checkpoint-{checkpoint_step}"))
    assert selection.score == reference_selection.score == ("attribution" if options else "projection")
    assert selection.selected == reference_selection.selected
    assert resumed.frozen_groups == reference.frozen_groups
    assert selection.report.scores == reference_selection.report.scores
    final = snapshot(resumed.model)
    for name in resumed.bias_layout.names(resumed.frozen_groups):
        assert torch.equal(final[name], resumed.pretrained_biases[name])
    for name, value in expected.items():
        torch.testing.assert_close(final[name], value, rtol=1e-5, atol=1e-6)
    checkpoint = tmp_path / "reference" / f"checkpoint-{checkpoint_step}"
    assert os.path.isfile(checkpoint / "beft_state.json")


def test_gpt2_fused_bias_slices_freeze_exactly(tmp_path):
    model = tiny_model("gpt2")
    fused_before = model.state_dict()["transformer.h.0.attn.c_attn.bias"].clone()
    at_switch = AtSwitch(3)
    selection = BiasSelectionCallback(probe_steps=3, exclude_inert=False, score="magnitude")
    trainer = BeftTrainer(
        model, training_args(tmp_path, max_steps=7), train_dataset=TokenDataset(), callbacks=[selection, at_switch]
    )
    pretrained = snapshot(model)
    trainer.train()
    assert_frozen_after_switch(trainer, at_switch.values, pretrained)
    fused_after = model.state_dict()["transformer.h.0.attn.c_attn.bias"]
    width = fused_before.numel() // 3
    for index, bias_type in enumerate("qkv"):
        part = slice(index * width, (index + 1) * width)
        changed = not torch.equal(fused_before[part], fused_after[part])
        assert changed == (bias_type in selection.selected), bias_type


def test_types_beyond_qkv_are_candidates(tmp_path):
    model = tiny_bert()
    at_switch = AtSwitch(3)
    selection = BiasSelectionCallback(probe_steps=3, candidates=("attn_out", "mlp_in", "mlp_out", "ln"), top_k=2)
    trainer = BeftTrainer(
        model, training_args(tmp_path, max_steps=6), train_dataset=TokenDataset(), callbacks=[selection, at_switch]
    )
    pretrained = snapshot(model)
    trainer.train()
    assert len(selection.selected) == 2 and set(selection.selected) <= {"attn_out", "mlp_in", "mlp_out", "ln"}
    assert len(trainer.bias_layout.names(["ln"])) == 4
    assert_frozen_after_switch(trainer, at_switch.values, pretrained)


def test_per_layer_scores_combine_a_layers_vectors_as_the_type_score_does(tmp_path):
    # BERT's ln has two LayerNorms per layer: each layer's entry holds both, not whichever came last.
    selection = BiasSelectionCallback(probe_steps=3, candidates=("ln", "v"))
    BeftTrainer(
        tiny_bert(), training_args(tmp_path, max_steps=4), train_dataset=TokenDataset(), callbacks=[selection]
    ).train()
    with open(tmp_path / REPORT_NAME) as f:
        ln = json.load(f)["scores"]["ln"]
    assert list(ln["per_layer"]["movement"]) == ["0", "1"]
    assert sum(ln["per_layer"]["movement"].values()) == pytest.approx(ln["movement"], rel=1e-12)
    for score in ("projection", "magnitude", "fisher"):  # two vectors in every layer: the mean of means
        assert sum(ln["per_layer"][score].values()) / 2 == pytest.approx(ln[score], rel=1e-12)


@pytest.mark.parametrize(("share", "max_steps", "count"), [(0.25, 10, 3), (0.1, 30, 3), (0.01, 6, 1)])
def test_a_share_of_the_run_probes_that_many_steps_rounded_up(share, max_steps, count, tmp_path):
    model = tiny_bert()
    at_switch = AtSwitch(count)
    selection = BiasSelectionCallback(probe_steps=share)
    trainer = BeftTrainer(
        model,
        training_args(tmp_path, max_steps=max_steps),
        train_dataset=TokenDataset(),
        callbacks=[selection, at_switch],
    )
    pretrained = snapshot(model)
    trainer.train()
    assert selection.probe_steps == share and selection.probe_step_count == count
    assert selection.report.probe_steps == count and selection.report.step == count
    assert_frozen_after_switch(trainer, at_switch.values, pretrained)


def test_summary_is_logged_at_info(tmp_path, caplog):
    selection = BiasSelectionCallback(probe_steps=2)
    trainer = BeftTrainer(
        tiny_bert(), training_args(tmp_path, max_steps=4), train_dataset=TokenDataset(), callbacks=[selection]
    )
    with caplog.at_level(logging.INFO, logger="beft_trainer.callback"):
        trainer.train()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("BEFT selected")]
    assert lines == [selection.report.summary()]
    assert f"BEFT selected {selection.selected[0]} at step 2 by projection" in lines[0]
    logged = [entry for entry in trainer.state.log_history if "beft/v/projection" in entry]
    assert len(logged) == 1 and logged[0]["beft/v/projection"] == selection.report.scores["v"]["projection"]
    assert (tmp_path / "beft_selection.png").stat().st_size > 10_000


def test_the_plot_is_drawn_beside_training_and_finished_by_train_end(tmp_path, monkeypatch):
    import threading

    import beft_trainer.plot as plot

    release, outcome, steps_after_switch = threading.Event(), {}, []

    def slow_plot(report, png_path):  # finishes only once training went on for two steps: never if drawn inline
        outcome["released"] = release.wait(timeout=10)
        return plot_report(report, png_path)

    class StepsAfterTheSwitch(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if selection.selected is not None and len(steps_after_switch) < 2:
                steps_after_switch.append(state.global_step)
                if len(steps_after_switch) == 2:
                    release.set()

    plot_report = plot.plot_report
    monkeypatch.setattr(plot, "plot_report", slow_plot)
    selection = BiasSelectionCallback(probe_steps=2)
    trainer = BeftTrainer(
        tiny_bert(),
        training_args(tmp_path, max_steps=6),
        train_dataset=TokenDataset(),
        callbacks=[selection, StepsAfterTheSwitch()],
    )
    trainer.train()
    assert outcome == {"released": True}, "the switch step waited for the plot"
    assert steps_after_switch == [2, 3]
    assert (tmp_path / "beft_selection.png").stat().st_size > 10_000  # joined before train() returned


def test_a_failing_plot_is_logged_and_the_run_finishes(tmp_path, monkeypatch, caplog):
    import beft_trainer.plot as plot

    def broken(report, png_path):
        raise OSError("disk full")

    monkeypatch.setattr(plot, "plot_report", broken)
    selection = BiasSelectionCallback(probe_steps=2)
    trainer = BeftTrainer(
        tiny_bert(), training_args(tmp_path, max_steps=4), train_dataset=TokenDataset(), callbacks=[selection]
    )
    with caplog.at_level(logging.WARNING, logger="beft_trainer.plot"):
        trainer.train()
    assert selection.selected and trainer.state.global_step == 4
    assert any("Could not plot the selection report: disk full" in r.getMessage() for r in caplog.records)


class _StepRecorder(TrainerCallback):
    """Records, independently of the probe, each step's gradient (summed over micro-batches) and values."""

    def __init__(self, params: dict[str, torch.Tensor]) -> None:
        self.params = params
        self.grads: list[dict[str, torch.Tensor]] = [{}]
        self.values = [{n: p.detach().clone() for n, p in params.items()}]
        for name, param in params.items():
            param.register_hook(lambda grad, name=name: self._add(name, grad))

    def _add(self, name: str, grad: torch.Tensor) -> None:
        current = self.grads[-1]
        current[name] = current.get(name, torch.zeros_like(grad)) + grad.detach()

    def on_step_end(self, args, state, control, **kwargs):
        self.values.append({n: p.detach().clone() for n, p in self.params.items()})
        self.grads.append({})


def test_probing_copies_nothing_to_the_host_until_the_switch(tmp_path, monkeypatch):
    """On a GPU every copy to the host waits for the queued kernels: the probe keeps its per-step
    statistics on the parameters' device and reads them back once, at the switch."""
    import sys

    step = {"now": 0}
    copies: list[tuple[int, str]] = []
    to_host = torch.Tensor.cpu

    def counted_cpu(tensor, *args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("beft_trainer"):
            copies.append((step["now"], caller))
        return to_host(tensor, *args, **kwargs)

    class Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            step["now"] = state.global_step + 1

    monkeypatch.setattr(torch.Tensor, "cpu", counted_cpu)
    selection = BiasSelectionCallback(probe_steps=4)
    trainer = BeftTrainer(
        tiny_bert(), training_args(tmp_path, max_steps=6), train_dataset=TokenDataset(), callbacks=[Steps(), selection]
    )
    trainer.train()
    assert selection.selected
    assert [c for c in copies if 1 <= c[0] < 4] == [], "the probe copied to the host while probing"
    assert any(c[0] == 4 for c in copies), "the switch reads the statistics back: the counter must see it"


def test_attribution_is_the_loss_each_vector_removed_to_first_order(tmp_path):
    """-sum_t g_t . (theta_t - theta_(t-1)) per vector, with g_t summed over accumulated micro-batches."""
    model = tiny_bert()
    # No rewind: the recorder runs after the switch and would see rewound values at the last probing step.
    selection = BiasSelectionCallback(probe_steps=3, exclude_inert=False, rewind=False)
    args = training_args(tmp_path, max_steps=5, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    trainer = BeftTrainer(model, args, train_dataset=TokenDataset(), callbacks=[selection])
    names = trainer.bias_layout.names(["q", "k", "v"])
    recorder = _StepRecorder({n: p for n, p in model.named_parameters() if n in names})
    trainer.add_callback(recorder)
    trainer.train()
    for bias_type in ("q", "k", "v"):
        per_layer = selection.report.scores[bias_type]["per_layer"]["attribution"]
        for vector in trainer.bias_layout.vectors[bias_type]:
            name = vector.name
            expected = -sum(
                float((recorder.grads[t][name].double() * (after[name] - before[name]).double()).sum())
                for t, (before, after) in enumerate(zip(recorder.values[:3], recorder.values[1:4], strict=True))
            )
            assert per_layer[str(vector.layer)] == pytest.approx(expected, rel=1e-9, abs=1e-15)
    # Training lowered the loss through q and v: their credit is positive.
    assert selection.report.scores["v"]["attribution"] > 0


@pytest.mark.parametrize("scale", [True, False], ids=["scaled", "unscaled"])
def test_several_kept_types_train_at_the_rate_over_sqrt_k(scale, tmp_path):
    selection = BiasSelectionCallback(probe_steps=2, top_k=2, exclude_inert=False, scale_learning_rate=scale)
    args = training_args(tmp_path, max_steps=4, lr_scheduler_type="constant")
    trainer = BeftTrainer(tiny_bert(), args, train_dataset=TokenDataset(), callbacks=[selection])
    trainer.train()
    groups = trainer.optimizer.param_groups
    expected = 1e-2 / 2**0.5 if scale else 1e-2
    for bias_type in ("q", "k", "v"):
        rate = groups[trainer.group_index[bias_type]]["lr"]
        assert rate == pytest.approx(expected if bias_type in selection.selected else 0.0, rel=1e-12)
    head = [g for g in trainer.parameter_groups if g not in ("q", "k", "v")]
    assert all(groups[trainer.group_index[g]]["lr"] == pytest.approx(1e-2) for g in head)


class _RateRecorder(TrainerCallback):
    """Each step's learning rate of the given optimizer groups, read after the step."""

    def __init__(self, trainer, group_names):
        self.trainer, self.group_names, self.rates = trainer, group_names, []

    def on_step_end(self, args, state, control, **kwargs):
        groups = self.trainer.optimizer.param_groups
        self.rates.append({g: groups[self.trainer.group_index[g]]["lr"] for g in self.group_names})


@pytest.mark.parametrize("scale", [True, False], ids=["scaled", "unscaled"])
def test_the_probe_trains_n_candidates_at_the_rate_over_sqrt_n(scale, tmp_path):
    selection = BiasSelectionCallback(probe_steps=2, exclude_inert=False, scale_probe_learning_rate=scale)
    args = training_args(tmp_path, max_steps=4, lr_scheduler_type="constant")
    trainer = BeftTrainer(tiny_bert(), args, train_dataset=TokenDataset(), callbacks=[selection])
    recorder = _RateRecorder(trainer, ["q", "k", "v", "head"])
    # Inserted before the selection callback, so the switch step is recorded with the probe's rates.
    trainer.callback_handler.callbacks.insert(0, recorder)
    trainer.train()
    probe_rate = 1e-2 / 3**0.5 if scale else 1e-2
    for step in recorder.rates[:2]:
        assert [step[t] for t in ("q", "k", "v")] == pytest.approx([probe_rate] * 3, rel=1e-12)
        assert step["head"] == pytest.approx(1e-2, rel=1e-12)
    (kept,) = selection.selected
    assert selection.report.learning_rates == pytest.approx({"probe": probe_rate, "after_switch": 1e-2}, rel=1e-12)
    for step in recorder.rates[2:]:
        assert step[kept] == pytest.approx(1e-2, rel=1e-12)
        assert all(step[t] == 0.0 for t in ("q", "k", "v") if t != kept)


def test_a_resumed_run_keeps_the_scaled_rate(tmp_path):
    def trainer_for(folder):
        args = training_args(folder, max_steps=6, save_strategy="steps", save_steps=3, per_device_train_batch_size=4)
        selection = BiasSelectionCallback(probe_steps=2, top_k=2, exclude_inert=False)
        return BeftTrainer(tiny_bert(), args, train_dataset=TokenDataset(), callbacks=[selection])

    reference = trainer_for(tmp_path / "run")
    reference.train()
    resumed = trainer_for(tmp_path / "run")
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    rates = [[g["lr"] for g in t.optimizer.param_groups] for t in (reference, resumed)]
    assert rates[0] == pytest.approx(rates[1], rel=1e-12)
    final = snapshot(resumed.model)
    for name, value in snapshot(reference.model).items():
        torch.testing.assert_close(final[name], value, rtol=1e-5, atol=1e-6)
