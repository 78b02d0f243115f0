"""Serving bias adapters: mixed batches (one adapter per row, bit-exact per row) and merged checkpoints."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from helpers import VOCAB, randomize_biases, tiny_model
from safetensors.torch import load_file

from beft_trainer import (
    AdapterError,
    build_adapter,
    find_biases,
    find_head_parameters,
    load_adapter,
    load_mixed_adapters,
    merge_adapter,
    save_merged,
    split_fused_qkv_bias,
)
from beft_trainer.adapters.rowwise import RowVectors, row_forward
from beft_trainer.cli import main
from beft_trainer.errors import PeftExportError

NAMES = ["t0", None, "t1", "t2", "t1", "t0"]


def causal_lm(model_type: str) -> tf.PreTrainedModel:
    """A tiny random causal LM (no head: its adapters are biases only)."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    configs = {
        "opt": lambda: tf.OPTConfig(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32, word_embed_proj_dim=16, **common
        ),
        "gpt2": lambda: tf.GPT2Config(n_embd=16, n_layer=2, n_head=2, **common),
        "qwen2": lambda: tf.Qwen2Config(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=32,
            **common,
        ),
    }
    return randomize_biases(tf.AutoModelForCausalLM.from_config(configs[model_type]())).eval()


def make_adapter(model: torch.nn.Module, seed: int, bias_types=("v",)):
    """An adapter of ``model``'s architecture: the given bias types and the head moved at random."""
    split_fused_qkv_bias(model)
    pretrained = {n: p.detach().clone() for n, p in model.named_parameters()}
    layout = find_biases(model)
    groups = {t: layout.names([t]) for t in bias_types}
    moved = {n for names in groups.values() for n in names} | set(head := find_head_parameters(model))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in moved:
                param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    return build_adapter(model, groups, pretrained, head=head)


def classifier_adapters(model_type: str, bias_types=("v",)):
    """Three adapters with 2, 3 and 2 labels."""
    return {
        f"t{i}": make_adapter(tiny_model(model_type, num_labels=labels), i, bias_types)
        for i, labels in enumerate((2, 3, 2))
    }


def batch(rows: int = 6, length: int = 7):
    ids = torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(7))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def single_task_logits(model_type, adapter, inputs):
    """The reference: a fresh base model with only this adapter applied, on the same batch."""
    model = tiny_model(model_type, num_labels=adapter.metadata.num_labels if adapter else 2).eval()
    if adapter is not None:
        load_adapter(model, adapter)
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert", "gpt2", "opt", "qwen2"])
def test_each_row_equals_its_single_adapter_model(model_type):
    adapters = classifier_adapters(model_type, ("q", "v") if model_type != "distilbert" else ("v",))
    model = tiny_model(model_type).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}  # GPT-2's c_attn is split on load
    mixed = load_mixed_adapters(model, adapters)
    inputs = batch()
    with torch.no_grad():
        logits = model(**inputs, adapter_names=NAMES).logits
    assert logits.shape == (6, 3)
    assert mixed.num_labels(NAMES) == [2, 2, 3, 2, 3, 2]
    for name in set(NAMES):
        reference = single_task_logits(model_type, adapters.get(name), inputs)
        for row in (i for i, n in enumerate(NAMES) if n == name):
            width = reference.shape[-1]
            assert torch.equal(logits[row, :width], reference[row]), (name, row)
            assert torch.isneginf(logits[row, width:]).all()
    after = model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)  # shared weights untouched


def test_without_adapter_names_the_model_is_the_base_and_unload_restores_it():
    model = tiny_model("bert").eval()
    inputs = batch()
    with torch.no_grad():
        plain = model(**inputs).logits
        mixed = load_mixed_adapters(model, classifier_adapters("bert"))
        assert torch.equal(model(**inputs).logits, plain)
        assert torch.equal(model(**inputs, adapter_names=[None] * 6).logits, plain)
        assert not torch.equal(model(**inputs, adapter_names=["t0"] * 6).logits, plain)
        mixed.unload()
        assert torch.equal(model(**inputs).logits, plain)
    assert not hasattr(model, "beft_mixed_adapters") and "generate" not in vars(model)


def test_layernorm_adapters_work_per_task():
    adapters = classifier_adapters("bert", ("v", "ln"))
    model = tiny_model("bert").eval()
    load_mixed_adapters(model, adapters)
    inputs = batch()
    with torch.no_grad():
        logits = model(**inputs, adapter_names=NAMES).logits
    for row, name in enumerate(NAMES):
        reference = single_task_logits("bert", adapters.get(name), inputs)
        assert torch.equal(logits[row, : reference.shape[-1]], reference[row])


@pytest.mark.parametrize("model_type", ["opt", "gpt2", "qwen2"])
def test_causal_lm_forward_and_generate_per_row(model_type):
    adapters = {f"t{i}": make_adapter(causal_lm(model_type), i, ("q", "v")) for i in range(2)}
    model = causal_lm(model_type)
    load_mixed_adapters(model, adapters)
    names = ["t1", None, "t0"]
    inputs = batch(rows=3, length=5)
    settings = dict(max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        logits = model(**inputs, adapter_names=names).logits
        greedy = model.generate(**inputs, adapter_names=names, **settings)
        beams = model.generate(**inputs, adapter_names=names, num_beams=2, num_return_sequences=2, **settings)
    for name in set(names):
        reference = causal_lm(model_type)
        if name is not None:
            load_adapter(reference, adapters[name])
        with torch.no_grad():
            ref_logits = reference(**inputs).logits
            ref_greedy = reference.generate(**inputs, **settings)
            ref_beams = reference.generate(**inputs, num_beams=2, num_return_sequences=2, **settings)
        for row in (i for i, n in enumerate(names) if n == name):
            assert torch.equal(logits[row], ref_logits[row])
            assert torch.equal(greedy[row], ref_greedy[row])
            assert torch.equal(beams[2 * row : 2 * row + 2], ref_beams[2 * row : 2 * row + 2])


@pytest.mark.parametrize("shape", [(5, 8), (3, 4, 8), "transposed"])
def test_row_forward_matches_the_layer_holding_each_rows_bias(shape):
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 6)
    x = torch.randn(4, 3, 8).transpose(0, 1) if shape == "transposed" else torch.randn(shape)  # not contiguous
    biases = torch.randn(x.shape[0], 6)
    out = row_forward(layer, x, RowVectors(bias=biases))
    for row in range(x.shape[0]):
        with torch.no_grad():
            layer.bias.copy_(biases[row])
            assert torch.equal(out[row], layer(x)[row])


def test_mixed_batches_refuse_what_they_cannot_do():
    model = tiny_model("bert").eval()
    mixed = load_mixed_adapters(model, classifier_adapters("bert"))
    inputs = batch()
    with pytest.raises(AdapterError, match="No adapters named nope; loaded: t0, t1, t2"):
        model(**inputs, adapter_names=["nope"] * 6)
    with pytest.raises(AdapterError, match="has 2 names for a batch of 6 rows"):
        model(**inputs, adapter_names=["t0", "t1"])
    with pytest.raises(AdapterError, match="one adapter name"):
        model(**inputs, adapter_names="t0")
    with pytest.raises(AdapterError, match="different label counts"):
        model(**inputs, labels=torch.zeros(6, dtype=torch.long), adapter_names=NAMES)
    with pytest.raises(AdapterError, match="already loaded"):
        mixed.add(classifier_adapters("bert")["t0"], "t0")
    with pytest.raises(AdapterError, match="not the base model"):
        mixed.add(make_adapter(tiny_model("bert", seed=1), 0), "other")
    with mixed.use(["t0"] * 6), torch.no_grad():  # a refused forward leaves the rows of the block intact
        expected = model(**inputs).logits
        with pytest.raises(AdapterError, match="has 2 names"):
            model(**inputs, adapter_names=["t0", "t1"])
        assert torch.equal(model(**inputs).logits, expected)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, model(**inputs, adapter_names=[None] * 6).logits)
    model.train()
    with pytest.raises(AdapterError, match="for inference: call model.eval"):
        model(**inputs, adapter_names=NAMES)
    model.eval()
    mixed.remove("t1")
    with pytest.raises(AdapterError, match="No adapters named t1"):
        model(**inputs, adapter_names=NAMES)
    # with the right label count, labels are fine and the loss is the model's
    same = ["t0", None, "t2", "t2", None, "t0"]
    assert model(**inputs, labels=torch.zeros(6, dtype=torch.long), adapter_names=same).loss is not None


def test_mixed_refuses_a_model_with_an_applied_adapter():
    adapters = classifier_adapters("bert")
    model = tiny_model("bert").eval()
    load_adapter(model, adapters["t0"])
    with pytest.raises(AdapterError, match=r"set_adapter\(None\)"):
        load_mixed_adapters(model, {"t1": adapters["t1"]})


def test_memory_is_the_stacked_tables_and_the_heads():
    adapters = classifier_adapters("bert")
    model = tiny_model("bert").eval()
    memory = load_mixed_adapters(model, adapters).memory_bytes()
    # 2 layers' v: 2 tables of (1 base + 3 tasks) rows x 16 floats
    assert memory["tables"] == 2 * 4 * 16 * 4
    heads = sum(v.numel() * 4 for a in adapters.values() for n, v in a.head.items() if n.startswith("classifier"))
    assert memory["modules"] == heads


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "opt"])
def test_merged_checkpoint_reloads_with_identical_outputs(tmp_path, model_type):
    adapter = make_adapter(tiny_model(model_type, num_labels=3), 0, ("q", "v"))
    save_merged(adapter, tiny_model(model_type, num_labels=3), tmp_path / "merged")
    stored = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert not any(k.endswith(("bias_q", "bias_k", "bias_v")) for k in stored)  # GPT-2's c_attn.bias re-fused
    merged = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    reference = tiny_model(model_type, num_labels=3).eval()
    load_adapter(reference, adapter)
    with torch.no_grad():
        assert torch.equal(merged(**batch()).logits, reference(**batch()).logits)


def test_merge_refuses_non_empty_folders_and_added_biases(tmp_path):
    adapter = make_adapter(tiny_model("bert"), 0)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(PeftExportError, match="not empty .*notes.txt.*overwrite"):
        save_merged(adapter, tiny_model("bert"), tmp_path / "out")
    save_merged(adapter, tiny_model("bert"), tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "notes.txt").exists() and (tmp_path / "out" / "model.safetensors").exists()
    llama = tiny_model("llama")
    llama.config.pad_token_id = 0
    from beft_trainer import add_missing_biases

    add_missing_biases(llama)
    pretrained = {n: p.detach().clone() for n, p in llama.named_parameters()}
    added = build_adapter(llama, {"v": find_biases(llama).names(["v"])}, pretrained, added_biases=True)
    with pytest.raises(AdapterError, match="added q/k/v biases"):
        merge_adapter(tiny_model("llama"), added)


def test_beft_merge_command(tmp_path, capsys):
    tiny_model("bert", num_labels=3).save_pretrained(tmp_path / "base")
    base = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    adapter = make_adapter(base, 0, ("v",))
    adapter.save(tmp_path / "adapter")
    argv = ["merge", str(tmp_path / "adapter"), str(tmp_path / "out"), "--base-model", str(tmp_path / "base")]
    assert main(argv) == 0
    assert "with the adapter merged" in capsys.readouterr().out
    merged = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    reference = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base").eval()
    load_adapter(reference, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(merged(**batch()).logits, reference(**batch()).logits)
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert error.startswith("beft merge: error:") and "not empty" in error and error.count("\n") == 1
    assert main([*argv, "--overwrite"]) == 0


def test_a_parameter_of_a_module_with_submodules_is_refused_in_one_line():
    def with_attention_bias(model):
        attention = model.bert.encoder.layer[0].attention  # has submodules (self, output)
        attention.register_parameter("bias", torch.nn.Parameter(torch.zeros(16)))
        return model

    trained = with_attention_bias(tiny_model("bert"))
    name = "bert.encoder.layer.0.attention.bias"
    pretrained = {name: trained.get_parameter(name).detach().clone()}
    with torch.no_grad():
        trained.get_parameter(name).add_(1.0)
    adapter = build_adapter(trained, {"other": [name]}, pretrained)
    model = with_attention_bias(tiny_model("bert")).eval()
    with pytest.raises(AdapterError, match=r"attention \(BertAttention\), which has submodules.*leaf modules only"):
        load_mixed_adapters(model, {"odd": adapter})


def test_no_adapter_is_applied_to_a_model_serving_mixed_batches():
    adapters = classifier_adapters("bert")
    model = tiny_model("bert").eval()
    load_mixed_adapters(model, {"t0": adapters["t0"]})
    names = ["t0", None, "t0", None, None, "t0"]
    with torch.no_grad():
        expected = model(**batch(), adapter_names=names).logits
    for apply in (load_adapter, merge_adapter):
        with pytest.raises(AdapterError, match=r"serves mixed batches \(load_mixed_adapters: t0\).*unload\(\) first"):
            apply(model, adapters["t2"])
    with torch.no_grad():
        assert torch.equal(model(**batch(), adapter_names=names).logits, expected)
    assert not hasattr(model, "beft_adapters")
    model.beft_mixed_adapters.unload()
    load_adapter(model, adapters["t2"])  # the plain model again: it takes the adapter


@pytest.mark.parametrize("adapter_name", ["default", "other"])
def test_merge_refuses_a_model_holding_loaded_adapters(adapter_name):
    adapters = classifier_adapters("bert")
    model = tiny_model("bert").eval()
    load_adapter(model, adapters["t0"], adapter_name=adapter_name)
    with torch.no_grad():
        expected = model(**batch()).logits
    with pytest.raises(AdapterError, match=rf"holds adapters from load_adapter \({adapter_name}\).*freshly loaded"):
        merge_adapter(model, adapters["t2"])
    with torch.no_grad():
        assert torch.equal(model(**batch()).logits, expected)
    model.beft_adapters.remove(adapter_name)  # the base model again: merging into it is fine
    merge_adapter(model, adapters["t2"])
    with torch.no_grad():
        assert torch.equal(model(**batch()).logits, single_task_logits("bert", adapters["t2"], batch()))
