"""Bias discovery: exact names per architecture, GPT-2's fused bias, bias-free models."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model

from beft_trainer import BeftConfig, BeftConfigError, BeftTrainer, BiasTypeError, add_missing_biases, find_biases
from beft_trainer.heads import find_head_parameters

ENCODERS = ["bert", "roberta", "distilbert", "electra", "mpnet"]


@pytest.mark.parametrize("model_type", ENCODERS + ["opt", "gpt2"])
def test_every_layer_has_one_vector_of_each_type(model_type):
    model = tiny_model(model_type)
    if model_type == "gpt2":
        from beft_trainer import split_fused_qkv_bias

        assert split_fused_qkv_bias(model) == 2
    layout = find_biases(model)
    assert layout.types == ("q", "k", "v", "attn_out", "mlp_in", "mlp_out", "ln")
    for bias_type in ("q", "k", "v", "attn_out", "mlp_in", "mlp_out"):
        assert [v.layer for v in layout.vectors[bias_type]] == [0, 1]
    assert [v.layer for v in layout.vectors["ln"]] == [0, 0, 1, 1]
    typed = set(layout.names(layout.types))
    assert len(typed) == 16
    # Nothing is typed twice, and every remaining bias is reported as "other".
    all_biases = {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1].startswith("bias")}
    assert typed | set(layout.other_biases) == all_biases
    assert not typed & set(layout.other_biases)


def test_bert_attention_output_bias_is_not_a_value_bias():
    layout = find_biases(tiny_model("bert"))
    assert layout.names(["v"]) == [
        "bert.encoder.layer.0.attention.self.value.bias",
        "bert.encoder.layer.1.attention.self.value.bias",
    ]
    assert "bert.encoder.layer.0.attention.output.dense.bias" in layout.names(["attn_out"])
    assert "bert.encoder.layer.0.output.dense.bias" in layout.names(["mlp_out"])


def test_qwen2_has_only_qkv_biases():
    layout = find_biases(tiny_model("qwen2"))
    assert layout.types == ("q", "k", "v")
    with pytest.raises(BiasTypeError, match="no 'attn_out' biases"):
        layout.require(["attn_out"])


def test_gpt2_split_keeps_outputs_and_state_dict():
    from beft_trainer import split_fused_qkv_bias

    model = tiny_model("gpt2").eval()
    ids = torch.randint(3, 60, (2, 7))
    before = model(input_ids=ids).logits
    fused_state = {k: v.clone() for k, v in model.state_dict().items()}
    split_fused_qkv_bias(model)
    assert torch.equal(model(input_ids=ids).logits, before)
    state = model.state_dict()
    assert set(state) == set(fused_state)
    assert all(torch.equal(state[k], fused_state[k]) for k in state)
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.bias_v.add_(1.0)
    fused = model.state_dict()["transformer.h.0.attn.c_attn.bias"]
    assert torch.equal(fused[32:], fused_state["transformer.h.0.attn.c_attn.bias"][32:] + 1.0)
    assert torch.equal(fused[:32], fused_state["transformer.h.0.attn.c_attn.bias"][:32])
    reloaded = tiny_model("gpt2", seed=5)
    split_fused_qkv_bias(reloaded)
    reloaded.load_state_dict(model.state_dict())
    assert torch.equal(reloaded.transformer.h[0].attn.c_attn.bias_v, model.transformer.h[0].attn.c_attn.bias_v)


def test_bias_free_model_gets_a_clear_error_then_works_with_added_biases(tmp_path):
    from helpers import training_args

    model = tiny_model("llama")
    with pytest.raises(BiasTypeError, match="add_missing_biases=True"):
        BeftTrainer(model, training_args(tmp_path))
    model = tiny_model("llama").eval()
    ids = torch.randint(3, 60, (2, 7))
    before = model(input_ids=ids).logits
    assert add_missing_biases(model) == 6
    assert torch.equal(model(input_ids=ids).logits, before)
    trainer = BeftTrainer(model, training_args(tmp_path), beft_config=BeftConfig(bias_types=("v",)))
    assert trainer.parameter_groups["v"] == [
        "model.layers.0.self_attn.v_proj.bias",
        "model.layers.1.self_attn.v_proj.bias",
    ]


def test_unknown_architecture_is_a_clear_error():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(BiasTypeError, match="config.model_type"):
        find_biases(model)


@pytest.mark.parametrize(
    ("model_type", "expected"),
    [
        ("bert", ["classifier.weight", "classifier.bias"]),  # the pooler is the backbone's
        (
            "roberta",
            [
                "classifier.dense.weight",
                "classifier.dense.bias",
                "classifier.out_proj.weight",
                "classifier.out_proj.bias",
            ],
        ),
        ("distilbert", ["pre_classifier.weight", "pre_classifier.bias", "classifier.weight", "classifier.bias"]),
        ("opt", ["score.weight"]),
        ("qwen2", ["score.weight"]),
    ],
)
def test_head_detection(model_type, expected):
    assert find_head_parameters(tiny_model(model_type)) == expected


def test_causal_lm_has_no_default_head():
    import transformers as tf

    config = tf.OPTConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32, word_embed_proj_dim=16
    )
    assert find_head_parameters(tf.OPTForCausalLM(config)) == []


def test_explicit_head_modules_and_unknown_module():
    model = tiny_model("bert")
    assert find_head_parameters(model, ["classifier"]) == ["classifier.weight", "classifier.bias"]
    from beft_trainer import BeftConfigError

    with pytest.raises(BeftConfigError, match="neither a module nor a parameter"):
        find_head_parameters(model, ["score"])


def test_head_modules_may_name_parameters_once_each():
    model = tiny_model("bert")
    paper_head = ["classifier", "bert.pooler.dense.bias", "classifier.bias"]
    assert find_head_parameters(model, paper_head) == [
        "classifier.weight",
        "classifier.bias",
        "bert.pooler.dense.bias",
    ]


def test_add_missing_biases_on_a_model_with_its_own_biases_is_refused(tmp_path):
    from helpers import training_args

    # It would do nothing, and an adapter would then claim added biases (beft merge refuses those).
    with pytest.raises(BiasTypeError, match="'bert' model has no bias-free q/k/v projection"):
        BeftTrainer(tiny_model("bert"), training_args(tmp_path), beft_config=BeftConfig(add_missing_biases=True))
    model = tiny_model("llama")
    add_missing_biases(model)  # added before the trainer: a second pass adds none, and they stay added ones
    trainer = BeftTrainer(model, training_args(tmp_path), beft_config=BeftConfig(add_missing_biases=True))
    assert trainer.build_adapter().metadata.added_biases


def test_add_missing_biases_reads_a_comma_list_and_refuses_letters():
    assert add_missing_biases(tiny_model("llama"), "q,v") == 2 * tiny_model("llama").config.num_hidden_layers
    with pytest.raises(BeftConfigError, match="unknown bias types \\['qkv'\\]"):
        add_missing_biases(tiny_model("llama"), "qkv")
