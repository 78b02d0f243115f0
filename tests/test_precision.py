"""Memory-efficient bias-only training: ``BeftConfig(frozen_dtype=...)`` with bf16 mixed precision.

Frozen matrices are stored in bf16 with no fp32 copy; trainable parameters (biases being trained,
the task head) and every vector (LayerNorm weights, frozen biases) stay fp32 and the trainable ones move; the exact freeze after the switch still holds; and the loss
stays within bf16 rounding of the run that keeps fp32 weights.
"""

from __future__ import annotations

import pytest
import torch
from helpers import TokenDataset, snapshot, tiny_bert, tiny_model, training_args
from transformers import TrainerCallback

from beft_trainer import BeftConfig, BeftConfigError, BeftTrainer, BiasSelectionCallback

pytestmark = pytest.mark.filterwarnings("ignore")


class LossRecorder(TrainerCallback):
    """Keeps the logged training losses, one per logging step."""

    def __init__(self):
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


class SwitchSnapshot(TrainerCallback):
    """A copy of every parameter right after the selection switch (runs after the selection callback)."""

    def __init__(self, step: int):
        self.step = step
        self.params: dict[str, torch.Tensor] | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self.params = snapshot(model)


def _model(kind: str):
    return tiny_bert() if kind == "bert" else tiny_model(kind)


def _trainer(model, tmp_path, config=None, callbacks=None, **args):
    args.setdefault("bf16", True)
    return BeftTrainer(
        model, training_args(tmp_path, **args), train_dataset=TokenDataset(), beft_config=config, callbacks=callbacks
    )


def _trainable(trainer) -> set[str]:
    return {n for g in trainer.active_groups for n in trainer.parameter_groups[g]}


@pytest.mark.parametrize("kind", ["opt", "bert"])
def test_frozen_weights_bf16_trainable_fp32_before_and_after_training(kind, tmp_path):
    model = _model(kind)
    trainer = _trainer(model, tmp_path, BeftConfig(bias_types=("v",), frozen_dtype="auto"), max_steps=4)
    trainable = _trainable(trainer)
    assert trainable and any(".bias" in n for n in trainable)
    before = snapshot(model)
    trainer.train()
    for name, param in model.named_parameters():
        expected = torch.bfloat16 if name not in trainable and param.dim() >= 2 else torch.float32
        assert param.dtype == expected, f"{name} is {param.dtype}, expected {expected}"
        if name in trainable:
            assert not torch.equal(param, before[name]), f"trainable {name} did not move"
        else:
            assert torch.equal(param, before[name]), f"frozen {name} moved"


def test_frozen_dtype_halves_frozen_parameter_bytes(tmp_path):
    model = tiny_model("opt")
    fp32_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    trainer = _trainer(model, tmp_path, BeftConfig(bias_types=("v",), frozen_dtype="auto"))
    trainable = _trainable(trainer)
    shapes = {n: (p.numel(), p.dim()) for n, p in model.named_parameters()}
    expected = sum(2 * k if n not in trainable and dim >= 2 else 4 * k for n, (k, dim) in shapes.items())
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == expected < fp32_bytes


def test_exact_freeze_after_switch_with_bf16_frozen_weights(tmp_path):
    model = tiny_model("opt")
    probe = BiasSelectionCallback(probe_steps=4)
    at_switch = SwitchSnapshot(step=4)
    trainer = _trainer(model, tmp_path, BeftConfig(frozen_dtype="auto"), [probe, at_switch], max_steps=12)
    trainer.train()
    assert probe.selected and at_switch.params is not None
    training = _trainable(trainer)
    selected = set(trainer.bias_layout.names(probe.selected))
    assert selected <= training
    for name, param in model.named_parameters():
        if name in training:
            assert param.dtype == torch.float32, name
        else:
            assert torch.equal(param, at_switch.params[name]), f"{name} moved after the switch"
    assert any(not torch.equal(dict(model.named_parameters())[n], at_switch.params[n]) for n in selected)


def _losses(kind, tmp_path, frozen_dtype, bf16=True):
    recorder = LossRecorder()
    model = _model(kind)
    trainer = _trainer(
        model, tmp_path, BeftConfig(bias_types=("v",), frozen_dtype=frozen_dtype), [recorder], bf16=bf16
    )
    trainer.train()
    biases = {n: p.detach().float().clone() for n, p in model.named_parameters() if n in _trainable(trainer)}
    return torch.tensor(recorder.losses), biases


@pytest.mark.parametrize("kind", ["opt", "bert"])
def test_loss_and_trained_biases_match_fp32_weights_within_bf16_rounding(kind, tmp_path):
    half, half_biases = _losses(kind, tmp_path / "half", "auto")
    mixed, mixed_biases = _losses(kind, tmp_path / "mixed", None)
    full, _ = _losses(kind, tmp_path / "fp32", None, bf16=False)
    assert len(half) == len(mixed) == 12
    # bf16 autocast already rounds every matmul; storing the frozen weights in bf16 changes only the
    # non-autocast ops (embeddings, LayerNorm): a few bf16 ulps (2**-8 relative) of an O(1) loss.
    torch.testing.assert_close(half, mixed, atol=3e-2, rtol=0)
    torch.testing.assert_close(half, full, atol=5e-2, rtol=0)
    for name, value in half_biases.items():
        torch.testing.assert_close(value, mixed_biases[name], atol=2e-2, rtol=2e-2, msg=name)


def test_auto_without_mixed_precision_keeps_fp32(tmp_path):
    model = tiny_model("opt")
    _trainer(model, tmp_path, BeftConfig(bias_types=("v",), frozen_dtype="auto"), bf16=False)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_explicit_half_dtype_without_mixed_precision_is_an_error(tmp_path):
    with pytest.raises(BeftConfigError, match="mixed precision"):
        _trainer(tiny_model("opt"), tmp_path, BeftConfig(bias_types=("v",), frozen_dtype="bfloat16"), bf16=False)


def test_unknown_frozen_dtype_is_an_error(tmp_path):
    with pytest.raises(BeftConfigError, match="frozen_dtype"):
        _trainer(tiny_model("opt"), tmp_path, BeftConfig(bias_types=("v",), frozen_dtype="int8"))


@pytest.mark.parametrize("kind", ["opt", "bert"])
def test_bitfit_with_bf16_frozen_weights_trains(kind, tmp_path):
    """BitFit trains LayerNorm biases: a norm whose weight is bf16 and bias fp32 must still run."""
    model = _model(kind)
    trainer = _trainer(model, tmp_path, BeftConfig(bias_types="all", frozen_dtype="auto"), max_steps=3)
    trainer.train()
    for name, param in model.named_parameters():
        if name in _trainable(trainer):
            assert param.dtype == torch.float32, name


def test_trainable_vectors_are_fp32_when_the_model_was_loaded_in_bf16(tmp_path):
    """A model loaded with dtype=torch.bfloat16: the trainable biases and head must train in fp32."""
    model = tiny_model("opt").to(torch.bfloat16)
    trainer = _trainer(model, tmp_path, BeftConfig(bias_types=("v",), frozen_dtype="auto"), max_steps=3)
    params = dict(model.named_parameters())
    assert {params[n].dtype for n in _trainable(trainer)} == {torch.float32}


ZERO3_CAST = """
import os, sys
sys.path.insert(0, {tests!r})
import deepspeed, torch
from helpers import tiny_bert
from beft_trainer.precision import cast_frozen_parameters
deepspeed.init_distributed("gloo", auto_mpi_discovery=False)
config = {{"zero_optimization": {{"stage": 3}}, "bf16": {{"enabled": True}}, "train_batch_size": 1}}
model = tiny_bert().to(torch.bfloat16)  # as from_pretrained(..., dtype=bfloat16) under zero.Init
deepspeed.zero.Init(module=model, config_dict_or_path=config, dtype=torch.bfloat16)
trainable = [n for n, _ in model.named_parameters() if n.endswith("value.bias")]
cast_frozen_parameters(model, torch.bfloat16, trainable)
for name, param in model.named_parameters():
    assert param.ds_tensor.dtype == torch.bfloat16, name
    assert param.dtype == param.ds_tensor.dtype, (name, param.dtype)  # a recast placeholder would differ
with deepspeed.zero.GatheredParameters([p for n, p in model.named_parameters() if n in trainable]):
    assert all(p.numel() > 0 and p.dtype == torch.bfloat16 for n, p in model.named_parameters() if n in trainable)
print("PARTITIONS UNTOUCHED")
"""


@pytest.mark.deepspeed
def test_zero3_partitions_are_left_to_deepspeed():
    """Under ZeRO-3 (zero.Init) the cast must not recast the empty placeholders of trained parameters."""
    import os
    import socket
    import subprocess
    import sys

    pytest.importorskip("deepspeed", reason="install the [deepspeed] extra")
    tests = os.path.dirname(os.path.abspath(__file__))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env |= {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    env |= {"PYTHONPATH": os.path.dirname(tests), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", ZERO3_CAST.format(tests=tests)], env=env, capture_output=True, text=True, timeout=300
    )
    assert "PARTITIONS UNTOUCHED" in result.stdout, result.stdout[-2000:] + result.stderr[-4000:]
