"""The selection callback with the Trainer's own features: best model, early stopping, schedulers,
clipping, torch.compile, checkpoints without optimizer state, and the features that just work."""

from __future__ import annotations

import logging
import os

import pytest
import torch
import transformers as tf
from helpers import TokenDataset, randomize_biases, snapshot, tiny_bert, training_args

from beft_trainer import BeftConfigError, BeftTrainer, BiasSelectionCallback, find_biases
from beft_trainer.errors import ResumeError
from beft_trainer.probe import ProbeStatistics


class _EveryStep(tf.TrainerCallback):
    """Copies every parameter at each step end (pass it after the selection callback)."""

    def __init__(self):
        self.values = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.values[state.global_step] = snapshot(model)


def _scores(values):
    """compute_metrics returning ``values`` in turn as ``score``."""
    it = iter(values)
    return lambda eval_prediction: {"score": float(next(it))}


def _run(tmp_path, probe_steps=4, callbacks=(), compute_metrics=None, **overrides):
    selection, steps = BiasSelectionCallback(probe_steps=probe_steps), _EveryStep()
    args = training_args(tmp_path, **({"max_steps": 10, "per_device_train_batch_size": 4} | overrides))
    trainer = BeftTrainer(
        tiny_bert(),
        args,
        train_dataset=TokenDataset(),
        eval_dataset=TokenDataset(size=8),
        compute_metrics=compute_metrics,
        callbacks=[selection, steps, *callbacks],
    )
    return trainer, selection, steps


def _assert_exact_after_switch(trainer, selection, steps, pretrained):
    """From the switch on, every parameter outside the kept groups is pretrained; the kept types train."""
    switch = selection.report.step
    training = {n for g in trainer.active_groups for n in trainer.parameter_groups[g]}
    for step, values in steps.values.items():
        if step >= switch:
            for name, value in values.items():
                if name not in training:
                    assert torch.equal(value, pretrained[name]), f"{name} moved at step {step}"
    final = snapshot(trainer.model)
    for name in trainer.bias_layout.names(trainer.active_groups):
        assert not torch.equal(final[name], steps.values[switch][name]), f"kept {name} did not train"


def test_an_evaluation_while_probing_never_hides_the_best_checkpoint_after_the_switch(tmp_path):
    # Evaluations at 2 (probing: every candidate trained), 4, 6, ...; checkpoints at 4, 8, 12. The probing score
    # is the highest: counted, it kept checkpoint-4 (9, the best after the switch) from being the best, and
    # checkpoint-8 (8) came back at the end.
    trainer, selection, steps = _run(
        tmp_path,
        probe_steps=3,
        max_steps=12,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=4,
        load_best_model_at_end=True,
        metric_for_best_model="score",
        greater_is_better=True,
        compute_metrics=_scores([10, 9, 5, 8, 1, 2]),
    )
    trainer.train()
    assert trainer.state.best_model_checkpoint == os.path.join(str(tmp_path), "checkpoint-4")
    assert trainer.state.best_metric == 9
    final = snapshot(trainer.model)
    assert all(torch.equal(final[n], steps.values[4][n]) for n in final)


def test_early_stopping_waits_for_the_switch(tmp_path):
    # The probing evaluations get worse: counted, EarlyStoppingCallback stopped the run at step 2, before any
    # selection, leaving every candidate type trained.
    trainer, selection, _ = _run(
        tmp_path,
        max_steps=8,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="score",
        greater_is_better=True,
        compute_metrics=_scores([10, 5, 4, 3, 2, 1, 0, 0]),
        callbacks=[tf.EarlyStoppingCallback(early_stopping_patience=1)],
    )
    trainer.train()
    assert selection.selected is not None and selection.report.step == 4
    assert trainer.state.global_step == 5  # the switch at 4 scored 3; step 5 (2) is worse
    assert trainer.state.best_model_checkpoint == os.path.join(str(tmp_path), "checkpoint-4")
    assert trainer.build_adapter().metadata.selected == selection.selected


class _StopAt(tf.TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_training_stopped_before_the_switch_says_so(tmp_path, caplog):
    trainer, selection, _ = _run(tmp_path, callbacks=[_StopAt(2)])
    with caplog.at_level(logging.WARNING, logger="beft_trainer.callback"):
        trainer.train()
    assert selection.selected is None and trainer.state.global_step == 2
    assert "Training stopped at step 2, before the switch at probe_steps=4: nothing was selected" in caplog.text
    assert trainer.build_adapter().metadata.selected == ["q", "k", "v"]  # what the model holds


def test_a_greedy_scheduler_reset_keeps_frozen_groups_at_rate_zero(tmp_path):
    # GreedyLR reduces every rate to min_lr, then resets each group to the rate it was built with: the frozen
    # groups' 0.01 came back (single-process training hid it: their requires_grad is off; DDP and ZeRO do not).
    trainer, selection, _ = _run(
        tmp_path,
        lr_scheduler_type="greedy",
        lr_scheduler_kwargs={"patience": 0, "factor": 0.1, "min_lr": 1e-3, "max_lr": 0.01, "reset_start": 1},
        eval_strategy="steps",
        eval_steps=1,
        metric_for_best_model="score",
        compute_metrics=_scores([1.0] * 10),
    )
    trainer.train()
    rates = {g: group["lr"] for g, group in zip(trainer.parameter_groups, trainer.optimizer.param_groups, strict=True)}
    assert trainer.frozen_groups and all(rates[g] == 0.0 for g in trainer.frozen_groups), rates


def test_clipping_leaves_the_frozen_groups_gradients_out(tmp_path):
    trainer, selection, _ = _run(tmp_path, max_steps=6, max_grad_norm=1.0)
    trainer.train()
    params = dict(trainer.model.named_parameters())
    kept = [n for g in trainer.active_groups for n in trainer.parameter_groups[g]]
    frozen = [n for g in trainer.frozen_groups for n in trainer.parameter_groups[g]]
    # As under DDP, where a frozen group keeps requires_grad and its (large) gradient.
    for name in kept:
        params[name].grad = torch.full_like(params[name], 1e-3)
    for name in frozen:
        params[name].requires_grad_(True)
        params[name].grad = torch.full_like(params[name], 10.0)
    norm = trainer._clip_grad_norm(trainer.model)
    kept_norm = torch.cat([torch.full_like(params[n], 1e-3).flatten() for n in kept]).norm()
    assert float(norm) == pytest.approx(float(kept_norm), rel=1e-5)
    assert all(torch.equal(params[n].grad, torch.full_like(params[n], 1e-3)) for n in kept)
    assert all(params[n].grad is None for n in frozen)


def _one_layer_bert():
    torch.manual_seed(0)
    config = tf.BertConfig(
        vocab_size=64,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return randomize_biases(tf.BertForSequenceClassification(config))


def test_the_probe_sees_per_token_gradients_under_torch_compile():
    # TrainingArguments(torch_compile=True): traced, the probe's forward hook lost the loss (the Trainer stopped:
    # "The model did not return a loss") or its per-token sums stayed 0 (every type "inert").
    batch = TokenDataset(size=4, length=8)[0:4]
    token_sums = {}
    for compiled in (False, True):
        model = _one_layer_bert()
        names = find_biases(model).names(("v",))
        for name, param in model.named_parameters():
            param.requires_grad_(name in names)
        forward = torch.compile(model, backend="eager") if compiled else model
        probe = ProbeStatistics()
        probe.track_tokens(model, names)
        output = forward(**batch)
        assert output.loss is not None
        output.loss.backward()
        probe.stop()
        token_sums[compiled] = {n: float(t) for n, t in probe.token_squared.items()}
    assert all(value > 0 for value in token_sums[True].values())
    assert token_sums[True] == pytest.approx(token_sums[False], rel=1e-5)


def test_a_checkpoint_saved_without_optimizer_state_is_refused_before_a_step(tmp_path):
    trainer, _, _ = _run(tmp_path, max_steps=6, save_strategy="steps", save_steps=2, save_only_model=True)
    trainer.train()
    resumed, _, _ = _run(tmp_path, max_steps=6, save_strategy="steps", save_steps=2, save_only_model=True)
    before = snapshot(resumed.model)
    with pytest.raises(ResumeError, match="no optimizer or scheduler state .saved with save_only_model=True."):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.state.global_step == 0
    assert all(torch.equal(before[n], p) for n, p in resumed.model.named_parameters())
    (tmp_path / "not_a_checkpoint").mkdir()
    with pytest.raises(ResumeError, match="is not a checkpoint .no trainer_state.json."):
        resumed.train(resume_from_checkpoint=str(tmp_path / "not_a_checkpoint"))


@pytest.mark.parametrize(
    "overrides",
    [
        {"gradient_accumulation_steps": 3, "per_device_train_batch_size": 2},
        {"optim": "adafactor", "weight_decay": 0.1},
        {"weight_decay": 0.1, "warmup_steps": 6, "max_grad_norm": 1e-3},
        {"gradient_checkpointing": True, "label_smoothing_factor": 0.1},
    ],
    ids=["accumulation", "adafactor-decay", "decay-warmup-past-switch-clipping", "checkpointing-smoothing"],
)
def test_the_switch_is_exact_with_the_trainers_options(overrides, tmp_path):
    trainer, selection, steps = _run(tmp_path, max_steps=7, **overrides)
    pretrained = snapshot(trainer.model)
    trainer.train()
    _assert_exact_after_switch(trainer, selection, steps, pretrained)


def test_a_resume_inside_the_probe_continues_bit_for_bit(tmp_path):
    options = {"save_strategy": "steps", "save_steps": 2, "gradient_accumulation_steps": 2, "warmup_steps": 3}
    reference, reference_selection, _ = _run(tmp_path, max_steps=6, per_device_train_batch_size=2, **options)
    reference.train()
    resumed, selection, _ = _run(tmp_path, max_steps=6, per_device_train_batch_size=2, **options)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert selection.report.scores == reference_selection.report.scores
    final, expected = snapshot(resumed.model), snapshot(reference.model)
    assert all(torch.equal(final[n], expected[n]) for n in expected)


def test_a_callback_of_a_refused_trainer_serves_the_next_one(tmp_path):
    selection = BiasSelectionCallback(probe_steps=2)
    with pytest.raises(BeftConfigError, match="ignores per-group learning rates"):
        BeftTrainer(
            tiny_bert(),
            training_args(tmp_path, optim="schedule_free_adamw"),
            train_dataset=TokenDataset(),
            callbacks=[selection],
        )
    trainer = BeftTrainer(
        tiny_bert(), training_args(tmp_path, max_steps=3), train_dataset=TokenDataset(), callbacks=[selection]
    )
    assert selection.trainer is trainer
