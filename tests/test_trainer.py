"""BeftTrainer without selection: what trains, what stays bit-identical, and bad input."""

from __future__ import annotations

import pytest
import torch
from helpers import TokenDataset, snapshot, tiny_bert, tiny_model, training_args
from transformers import Trainer

from beft_trainer import BeftConfig, BeftConfigError, BeftTrainer, BiasSelectionCallback, BiasTypeError

ARCHITECTURES = ["bert", "roberta", "distilbert", "electra", "mpnet", "opt", "gpt2", "qwen2"]


def _train(model, tmp_path, **kwargs):
    trainer = BeftTrainer(model, training_args(tmp_path, max_steps=6), train_dataset=TokenDataset(), **kwargs)
    before = snapshot(trainer.model)
    trainer.train()
    return trainer, before, snapshot(trainer.model)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_value_biases_and_head_train_everything_else_is_bit_identical(model_type, tmp_path):
    trainer, before, after = _train(tiny_model(model_type), tmp_path)
    trained = {n for names in trainer.parameter_groups.values() for n in names}
    assert set(trainer.parameter_groups) <= {"head", "head_decay", "v"}
    assert len(trainer.parameter_groups["v"]) == 2
    for name in before:
        if name in trained:
            assert not torch.equal(before[name], after[name]), f"{name} did not train"
        else:
            assert torch.equal(before[name], after[name]), f"{name} moved"


def test_bitfit_trains_every_bias_and_only_biases_outside_the_head(tmp_path):
    trainer, before, after = _train(tiny_bert(), tmp_path, beft_config=BeftConfig(bias_types="all"))
    head = set(trainer.parameter_groups.get("head", []) + trainer.parameter_groups["head_decay"])
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    biases = {n for n in before if n.endswith(".bias")}
    assert moved - head == biases - head
    assert "bert.embeddings.LayerNorm.bias" in moved


def test_bias_types_given_as_a_comma_string():
    assert BeftConfig(bias_types="q,v").bias_types == ("q", "v")
    with pytest.raises(BeftConfigError, match="bias_types"):
        BeftConfig(bias_types=("value",))


def test_head_can_be_left_frozen(tmp_path):
    trainer, before, after = _train(tiny_bert(), tmp_path, beft_config=BeftConfig(bias_types=("q",), train_head=False))
    assert list(trainer.parameter_groups) == ["q"]
    assert torch.equal(before["classifier.weight"], after["classifier.weight"])


def test_missing_bias_type_fails_before_training(tmp_path):
    with pytest.raises(BiasTypeError, match="has no 'attn_out' biases"):
        BeftTrainer(tiny_model("qwen2"), training_args(tmp_path), beft_config=BeftConfig(bias_types=("attn_out",)))
    with pytest.raises(BiasTypeError, match="has no 'mlp_in' biases"):
        BeftTrainer(
            tiny_model("qwen2"), training_args(tmp_path), callbacks=[BiasSelectionCallback(candidates=("q", "mlp_in"))]
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"score": "gradnorm"}, "Unknown score 'gradnorm'"),
        ({"candidates": ("q", "query")}, r"unknown bias types \['query'\]"),
        ({"candidates": ("v",)}, "at least two candidates"),
        ({"candidates": ("q", "v"), "top_k": 2}, "top_k=2 must be below"),
        ({"budget": 0}, "budget must be a parameter count"),
        ({"probe_steps": 0}, r"probe_steps must be a step count \(>= 1\) or a share of the run \(< 1\), got 0"),
        ({"inert_threshold": 2.0}, "inert_threshold"),
    ],
)
def test_bad_callback_arguments(kwargs, message):
    with pytest.raises(BeftConfigError, match=message):
        BiasSelectionCallback(**kwargs)


@pytest.mark.parametrize(
    ("probe_steps", "message"),
    [(5, r"probe_steps=5 leaves no training"), (0.81, r"probe_steps=0.81 \(5 steps\) leaves no training")],
)
def test_probe_steps_must_leave_training_after_the_switch(probe_steps, message, tmp_path):
    model = tiny_bert()
    before = snapshot(model)
    trainer = BeftTrainer(
        model,
        training_args(tmp_path, max_steps=5),
        train_dataset=TokenDataset(),
        callbacks=[BiasSelectionCallback(probe_steps=probe_steps)],
    )
    with pytest.raises(BeftConfigError, match=message):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_callback_with_a_plain_trainer_is_refused(tmp_path):
    with pytest.raises(BeftConfigError, match="needs BeftTrainer"):
        Trainer(
            tiny_bert(), training_args(tmp_path), train_dataset=TokenDataset(), callbacks=[BiasSelectionCallback()]
        )


def test_config_and_callback_together_are_refused(tmp_path):
    with pytest.raises(BeftConfigError, match="one or the other"):
        BeftTrainer(
            tiny_bert(),
            training_args(tmp_path),
            beft_config=BeftConfig(bias_types=("v",)),
            callbacks=[BiasSelectionCallback()],
        )


def test_optimizer_that_ignores_group_lr_is_refused(tmp_path):
    with pytest.raises(BeftConfigError, match="ignores per-group learning rates"):
        BeftTrainer(tiny_bert(), training_args(tmp_path, optim="schedule_free_adamw"), train_dataset=TokenDataset())


def test_optimizer_cls_and_kwargs_is_the_optimizer_and_the_switch_still_freezes_exactly(tmp_path):
    sgd = (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9})
    model = tiny_bert()
    before = snapshot(model)
    trainer = BeftTrainer(
        model,
        training_args(tmp_path, max_steps=6),
        train_dataset=TokenDataset(),
        callbacks=[BiasSelectionCallback(probe_steps=3, candidates=("q", "v"))],
        optimizer_cls_and_kwargs=sgd,
    )
    trainer.train()
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    kept, other = trainer.selection_callback.selected[0], ({"q", "v"} - set(trainer.selection_callback.selected)).pop()
    after = snapshot(model)
    layer = "bert.encoder.layer.0.attention.self"
    assert not torch.equal(after[f"{layer}.{_PROJECTION[kept]}.bias"], before[f"{layer}.{_PROJECTION[kept]}.bias"])
    assert torch.equal(after[f"{layer}.{_PROJECTION[other]}.bias"], before[f"{layer}.{_PROJECTION[other]}.bias"])


@pytest.mark.parametrize(
    "optimizer_cls_and_kwargs",
    [(lambda params, **kwargs: torch.optim.SGD(params, **kwargs), {"lr": 0.1}), (torch.optim.SGD, {"params": []})],
    ids=["a factory", "its own groups"],
)
def test_an_optimizer_cls_that_builds_its_own_groups_is_refused(optimizer_cls_and_kwargs, tmp_path):
    trainer = BeftTrainer(
        tiny_bert(),
        training_args(tmp_path),
        train_dataset=TokenDataset(),
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
    )
    with pytest.raises(BeftConfigError, match="builds its own parameter groups"):
        trainer.create_optimizer()


_PROJECTION = {"q": "query", "v": "value"}


def test_logged_learning_rate_is_the_heads_after_the_switch(tmp_path):
    trainer = BeftTrainer(
        tiny_bert(),
        training_args(tmp_path, max_steps=6),
        train_dataset=TokenDataset(),
        callbacks=[BiasSelectionCallback(probe_steps=3)],
    )
    trainer.train()
    rates = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert len(rates) == 6 and min(rates) > 0
