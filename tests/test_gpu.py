"""What only a GPU shows: the exact switch under bf16 autocast with bf16 frozen weights, and DeepSpeed
ZeRO-2/3 on one GPU selecting what the plain run selects and freezing exactly.

Marked ``gpu`` and skipped without CUDA (CI has none); run on a GPU machine with ``pytest -m gpu``.
The runs start from weights bf16 represents exactly (``exactness_run.bf16_representable``), so the
pretrained values stay comparable after DeepSpeed's bf16 engine or ``frozen_dtype="auto"`` casts them.
"""

from __future__ import annotations

import sys

import pytest
import torch
from exactness import assert_exact_selection_run, load_runs
from helpers import TokenDataset, snapshot, tiny_model, training_args
from scripts.exactness_run import bf16_representable
from test_backends import SCRIPT, _deepspeed, _launch

from beft_trainer import BeftConfig, BeftTrainer, BiasSelectionCallback

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _plain_gpu_run(out) -> None:
    _launch([sys.executable, SCRIPT, "--out", str(out), "--cuda"], gpu=True)


def _selected(out) -> list[str]:
    return load_runs(str(out))[0][0]["selected"]


def test_exact_switch_under_bf16_autocast_with_bf16_frozen_weights(tmp_path):
    model = bf16_representable(tiny_model("opt"))
    selection = BiasSelectionCallback(probe_steps=4)
    args = training_args(tmp_path, use_cpu=False, bf16=True, max_steps=12)
    trainer = BeftTrainer(
        model, args, train_dataset=TokenDataset(), beft_config=BeftConfig(frozen_dtype="auto"), callbacks=[selection]
    )
    before = snapshot(model)
    trainer.train()
    training = {n for g in trainer.active_groups for n in trainer.parameter_groups[g]}
    selected = set(trainer.bias_layout.names(selection.selected))
    assert selection.selected and selected <= training
    for name, param in model.named_parameters():
        assert param.device.type == "cuda", f"{name} is on {param.device}"
        if name in training:
            assert param.dtype == torch.float32, f"trained {name} is {param.dtype}"
        elif param.dim() >= 2:
            assert param.dtype == torch.bfloat16, f"frozen matrix {name} is {param.dtype}"
    moved = [n for n in selected if not torch.equal(dict(model.named_parameters())[n].float(), before[n].float())]
    assert moved, "the selected type did not train"


def test_plain_gpu_run_freezes_exactly_with_bf16_frozen_weights(tmp_path):
    _plain_gpu_run(tmp_path)
    assert_exact_selection_run(str(tmp_path), world_size=1)
    record = load_runs(str(tmp_path))[0][0]
    assert record["device"] == "cuda" and "torch.bfloat16" in record["frozen_dtypes"], record


@pytest.mark.deepspeed
@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_zero_on_one_gpu_selects_what_the_plain_run_selects_and_freezes_exactly(stage, tmp_path):
    pytest.importorskip("deepspeed", reason="install the [deepspeed] extra")
    plain, zero = tmp_path / "plain", tmp_path / "zero"
    _plain_gpu_run(plain)
    _launch(_deepspeed(1, "--out", str(zero), "--zero_stage", str(stage), "--cuda"), gpu=True)
    assert_exact_selection_run(str(zero), world_size=1)
    assert load_runs(str(zero))[0][0]["device"] == "cuda"
    assert _selected(zero) == _selected(plain), f"ZeRO-{stage} selected {_selected(zero)}, plain {_selected(plain)}"
