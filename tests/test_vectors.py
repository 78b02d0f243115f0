"""Scaling vectors (SSL/SSB): same guarantees as biases: output unchanged at init, exact freeze, rewind, adapters."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import AtSwitch, TokenDataset, assert_frozen_after_switch, snapshot, tiny_bert, tiny_model, training_args

from beft_trainer import (
    BeftConfig,
    BeftConfigError,
    BeftTrainer,
    BiasSelectionCallback,
    BiasTypeError,
    PeftExportError,
    build_adapter,
    export_peft,
    find_head_parameters,
    load_adapter,
    load_mixed_adapters,
    save_merged,
)
from beft_trainer.vectors import attach_scaling_vectors, find_vectors

FAMILY = ("v", "v_scale_in", "v_scale_out", "mlp_out_scale_in", "attn_out")


def _logits(model, dataset=None):
    batch = TokenDataset(size=8, seed=3) if dataset is None else dataset
    ids = torch.stack([batch[i]["input_ids"] for i in range(len(batch))])
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("model_type", ["bert", "opt", "qwen2", "llama", "distilbert", "mpnet"])
def test_attached_vectors_leave_the_output_bit_identical(model_type):
    model = tiny_model(model_type)
    before = _logits(model)
    added = attach_scaling_vectors(model, ["q_scale_in", "v_scale_out", "mlp_in_scale_out", "mlp_out_scale_in"])
    assert added > 0 and torch.equal(_logits(model), before)
    layout = find_vectors(model)
    assert {"q_scale_in", "v_scale_out", "mlp_in_scale_out", "mlp_out_scale_in"} <= set(layout.types)
    name = layout.vectors["v_scale_out"][0].name
    assert name.endswith(".beft_scale_out") and torch.equal(dict(model.named_parameters())[name], torch.ones(16))


def test_scaling_changes_the_output_like_a_scaled_weight():
    model = tiny_bert()
    attach_scaling_vectors(model, ["v_scale_in", "v_scale_out"])
    value = model.bert.encoder.layer[0].attention.self.value
    x = torch.randn(3, 16)
    with torch.no_grad():
        value.beft_scale_in.uniform_(0.5, 1.5)
        value.beft_scale_out.uniform_(0.5, 1.5)
        expected = (x @ (value.weight * value.beft_scale_in).t()) * value.beft_scale_out + value.bias
        torch.testing.assert_close(value(x), expected, rtol=1e-6, atol=1e-6)


def test_gpt2_fused_qkv_cannot_be_scaled_and_says_what_can():
    with pytest.raises(BiasTypeError, match="choose among attn_out_scale_in"):
        attach_scaling_vectors(tiny_model("gpt2"), ["v_scale_in"])


def test_selection_over_the_family_freezes_exactly_and_rewinds_to_one(tmp_path):
    model = tiny_bert()
    selection = BiasSelectionCallback(probe_steps=3, candidates=FAMILY, top_k=2, exclude_inert=False)
    at_switch = AtSwitch(3)
    trainer = BeftTrainer(
        model, training_args(tmp_path, max_steps=6), train_dataset=TokenDataset(), callbacks=[selection, at_switch]
    )
    pretrained = snapshot(model)
    trainer.train()
    assert_frozen_after_switch(trainer, at_switch.values, pretrained)
    final = snapshot(model)
    for vector_type in set(FAMILY) - set(selection.selected):
        for name in trainer.bias_layout.names([vector_type]):
            if name.endswith(("beft_scale_in", "beft_scale_out")):
                assert torch.equal(final[name], torch.ones_like(final[name]))
    entry = selection.report.scores["v_scale_in"]
    assert entry["kind"] == "scale" and entry["parameters"] == 2 * 16
    assert selection.report.scores["v"]["kind"] == "bias"


@pytest.mark.parametrize("vector_types", [("v_scale_in",), ("v_scale_out", "mlp_out_scale_in", "q")])
def test_adapter_with_scaling_vectors_reproduces_the_model_exactly(vector_types, tmp_path):
    model, adapter = _trained_adapter(tmp_path, vector_types)
    adapter.save(tmp_path / "adapter")
    trained = _logits(model)
    base = tiny_bert()
    load_adapter(base, tmp_path / "adapter")
    assert torch.equal(_logits(base), trained)
    assert (
        base.bert.encoder.layer[0].attention.self.value.beft_scale_in is not None or "v_scale_in" not in vector_types
    )


def test_gpt2_conv1d_layers_take_scaling_vectors():
    model = tiny_model("gpt2")
    before = _logits(model)
    assert attach_scaling_vectors(model, ["attn_out_scale_in", "mlp_in_scale_out", "mlp_out_scale_out"]) == 6
    assert torch.allclose(_logits(model), before, rtol=0, atol=1e-6)  # Conv1D's addmm vs linear + add: rounding


@pytest.mark.parametrize(("budget", "default_score"), [(70, "attribution"), (100, "movement")])
def test_a_budget_keeps_the_best_set_of_types_that_fits(budget, default_score, tmp_path):
    selection = BiasSelectionCallback(probe_steps=3, candidates=FAMILY, budget=budget, exclude_inert=False)
    trainer = BeftTrainer(
        tiny_bert(), training_args(tmp_path, max_steps=5), train_dataset=TokenDataset(), callbacks=[selection]
    )
    trainer.train()
    sizes = {t: selection.report.scores[t]["parameters"] for t in FAMILY}
    assert sizes == {"v": 32, "v_scale_in": 32, "v_scale_out": 32, "mlp_out_scale_in": 64, "attn_out": 32}
    assert selection.report.budget == budget and sum(sizes[t] for t in selection.selected) <= budget
    # the smallest type has 32 parameters: 70 holds two of them (attribution), 100 three (movement)
    assert selection.report.score == selection.score == default_score
    scores = selection.report.type_scores(default_score)
    fitting = [
        set(subset)
        for k in (1, 2, 3)
        for subset in itertools.combinations(FAMILY, k)
        if sum(sizes[t] for t in subset) <= budget
    ]
    assert set(selection.selected) == max(fitting, key=lambda subset: sum(scores[t] for t in subset))


def test_a_budget_below_every_candidate_is_refused_before_any_step(tmp_path):
    selection = BiasSelectionCallback(probe_steps=2, candidates=("v", "v_scale_in"), budget=10)
    trainer = BeftTrainer(
        tiny_bert(), training_args(tmp_path, max_steps=4), train_dataset=TokenDataset(), callbacks=[selection]
    )
    with pytest.raises(BeftConfigError, match="allows 10 parameters, but the smallest candidate has 32"):
        trainer.train()
    assert trainer.state.global_step == 0


def _trained_adapter(tmp_path, vector_types, model_type="bert", **config):
    model = tiny_model(model_type) if model_type != "bert" else tiny_bert()
    trainer = BeftTrainer(
        model,
        training_args(tmp_path / "run", max_steps=3),
        beft_config=BeftConfig(bias_types=vector_types, **config),
        train_dataset=TokenDataset(),
    )
    trainer.train()
    return model, trainer.build_adapter()


@pytest.mark.parametrize("head_modules", [None, ("classifier", "bert.pooler.dense.bias")])
def test_input_scalings_export_to_peft_ia3_with_the_same_outputs(tmp_path, head_modules):
    peft = pytest.importorskip("peft")
    types = ("v_scale_in", "mlp_out_scale_in")
    model, adapter = _trained_adapter(tmp_path, types, head_modules=head_modules)
    if head_modules is None:  # the classifier alone: nothing of the base model is needed
        export_peft(adapter, tmp_path / "ia3")
    else:  # a trained pooler bias: peft saves the whole pooler, its weight from the base model
        with pytest.raises(PeftExportError, match="pass base_model="):
            export_peft(adapter, tmp_path / "no-base")
        export_peft(adapter, tmp_path / "ia3", base_model=tiny_bert())
    loaded = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "ia3")
    assert isinstance(loaded.peft_config["default"], peft.IA3Config)
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=1e-5, atol=1e-6)


def test_an_output_scaling_exports_to_ia3_only_on_a_bias_free_layer(tmp_path):
    peft = pytest.importorskip("peft")
    _, with_bias = _trained_adapter(tmp_path / "bert", ("v_scale_out",))
    with pytest.raises(PeftExportError, match="this one has a bias"):
        export_peft(with_bias, tmp_path / "a", base_model=tiny_bert())
    model, bias_free = _trained_adapter(tmp_path / "llama", ("v_scale_out",), model_type="llama")
    with pytest.raises(PeftExportError, match="pass base_model="):
        export_peft(bias_free, tmp_path / "b")
    export_peft(bias_free, tmp_path / "c", base_model=tiny_model("llama"))
    loaded = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "c")
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("vector_types", "message"),
    [(("v_scale_in", "v_scale_out"), "both an input and an output scaling"), (("v", "v_scale_in"), "one tuner type")],
)
def test_what_ia3_cannot_hold_is_refused(vector_types, message, tmp_path):
    _, adapter = _trained_adapter(tmp_path, vector_types)
    with pytest.raises(PeftExportError, match=message):
        export_peft(adapter, tmp_path / "out", base_model=tiny_bert())
    assert not (tmp_path / "out").exists()


def _random_adapter(seed: int, vector_types: tuple[str, ...]):
    model = tiny_bert()
    scaling = [t for t in vector_types if "_scale_" in t]
    attach_scaling_vectors(model, scaling)
    pretrained = snapshot(model)
    layout = find_vectors(model)
    groups = {t: layout.names([t]) for t in vector_types}
    head = find_head_parameters(model)
    moved = {n for names in groups.values() for n in names} | set(head)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in moved:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    return build_adapter(model, groups, pretrained, head=head, scaling_types=scaling)


def test_mixed_batches_apply_scaling_vectors_per_row_exactly():
    adapters = {
        "ssl": _random_adapter(1, ("v_scale_in",)),
        "mixed": _random_adapter(2, ("v", "mlp_out_scale_in")),
        "ssb": _random_adapter(3, ("v_scale_in", "v_scale_out")),
    }
    names = ["ssl", None, "mixed", "ssb", "ssl", "ssb"]
    model = tiny_bert().eval()
    load_mixed_adapters(model, adapters)
    inputs = TokenDataset(size=6, seed=5)
    ids = torch.stack([inputs[i]["input_ids"] for i in range(6)])
    with torch.no_grad():
        logits = model(input_ids=ids, adapter_names=names).logits
    for row, name in enumerate(names):
        reference = tiny_bert().eval()
        if name is not None:
            load_adapter(reference, adapters[name])
        with torch.no_grad():
            assert torch.equal(logits[row], reference(input_ids=ids).logits[row]), name


def test_a_merged_checkpoint_folds_scaling_vectors_into_the_weights(tmp_path):
    import transformers as tf

    adapter = _random_adapter(4, ("v_scale_in", "v_scale_out", "v"))
    applied = tiny_bert().eval()
    load_adapter(applied, adapter)
    save_merged(adapter, tiny_bert(), tmp_path / "merged")
    merged = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert not any("beft_scale" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged), _logits(applied), rtol=1e-5, atol=1e-6)
