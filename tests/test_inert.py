"""Inert bias types: a type is inert when it cannot change the output, decided from gradients.

The criterion (scores.gradient_coherence): a vector's gradient is the sum of its per-token
gradients; real signal keeps |sum| comparable to sqrt(sum of squares) (coherence ~1), a gradient
that is zero in exact arithmetic leaves only the rounding residue of a cancellation (~eps). The
floor sqrt(eps) of the compute dtype sits between, so the decision holds in fp32 and under bf16.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TokenDataset, qkv_coherence, tiny_model, training_args

from beft_trainer import BeftConfig, BeftTrainer, BiasSelectionCallback, add_missing_biases, find_biases, find_inert
from beft_trainer.probe import ProbeStatistics
from beft_trainer.scores import gradient_coherence, rounding_floor

#: Which key bias cannot change the output: absolute positions (or none) make b_k a shift of each
#: softmax row; rotary positions rotate b_k differently per key, so it is not a shift.
KEY_IS_INERT = {"bert": True, "opt": True, "gpt2": True, "qwen2": False, "llama": False}


def probe_coherence(model, dtype: torch.dtype, batches: int = 2) -> dict[str, list[float]]:
    """Per type, each layer's gradient coherence after ``batches`` forward/backward passes."""

    def backward_passes(model) -> None:
        generator = torch.Generator().manual_seed(0)
        for _ in range(batches):
            ids = torch.randint(3, 64, (8, 16), generator=generator)
            labels = torch.randint(0, 2, (8,), generator=generator)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                model(input_ids=ids, labels=labels).loss.backward()

    return qkv_coherence(model, backward_passes)


def model_with_qkv_biases(model_type: str, initializer_range: float):
    model = tiny_model(model_type, initializer_range=initializer_range)
    if model_type == "llama":
        add_missing_biases(model)
    if model_type == "gpt2":
        from beft_trainer import split_fused_qkv_bias

        split_fused_qkv_bias(model)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("initializer_range", [0.02, 0.2])
@pytest.mark.parametrize("model_type", sorted(KEY_IS_INERT))
def test_only_a_key_bias_that_cannot_change_the_output_is_inert(model_type, initializer_range, dtype):
    coherence = probe_coherence(model_with_qkv_biases(model_type, initializer_range), dtype)
    inert = find_inert(coherence, rounding_floor({dtype}))
    assert sorted(inert) == (["k"] if KEY_IS_INERT[model_type] else []), coherence
    # Not a close call: the inert residue is >= 2x below the floor, real signal >= 2x above it.
    floor = rounding_floor({dtype})
    for bias_type, values in coherence.items():
        if bias_type in inert:
            assert max(values) < floor / 2, (bias_type, values)
        else:
            assert max(values) > 2 * floor, (bias_type, values)


def test_an_inert_residue_scales_with_the_dtypes_eps():
    model = model_with_qkv_biases("bert", 0.02)
    fp32 = max(probe_coherence(model, torch.float32)["k"])
    model.zero_grad()
    bf16 = max(probe_coherence(model, torch.bfloat16)["k"])
    assert fp32 < 1e-4 < bf16 < 0.05, (fp32, bf16)


def test_coherence_floor_and_reason():
    assert rounding_floor({torch.float32}) == pytest.approx(math.sqrt(torch.finfo(torch.float32).eps))
    assert rounding_floor({torch.float32, torch.bfloat16}) == pytest.approx(0.0884, rel=1e-3)
    # One real layer is enough: a type that can change the output anywhere is not inert.
    inert = find_inert({"q": [0.9, 0.8], "k": [1e-7, 0.5], "v": [2e-7, 3e-7]}, floor=3.5e-4)
    assert list(inert) == ["v"] and "rounding noise" in inert["v"]
    # A vector that got no gradient at all cannot change the output either.
    assert gradient_coherence([torch.zeros(4)], [0.0]) == [0.0]
    assert gradient_coherence([torch.tensor([9.0, 16.0])], [25.0]) == [1.0]  # one token: coherence 1


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_the_callback_excludes_exactly_the_inert_key(model_type, bf16, tmp_path):
    selection = BiasSelectionCallback(probe_steps=2, score="magnitude")
    beft = BeftConfig(add_missing_biases=model_type == "llama")
    args = training_args(tmp_path, max_steps=3, bf16=bf16)
    trainer = BeftTrainer(
        tiny_model(model_type), args, beft_config=beft, train_dataset=TokenDataset(), callbacks=[selection]
    )
    trainer.train()
    assert sorted(selection.report.inert) == (["k"] if KEY_IS_INERT[model_type] else [])


def test_per_token_statistics_survive_a_checkpoint_and_merge_over_ranks(tmp_path):
    model = model_with_qkv_biases("opt", 0.02)
    names = find_biases(model).names(("k",))
    params = dict(model.named_parameters())
    probe = ProbeStatistics()
    probe.track({n: params[n] for n in names}, {n: params[n].shape for n in names})
    probe.track_tokens(model, names)
    model(input_ids=torch.randint(3, 64, (4, 8)), labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    probe.stop()
    assert all(float(probe.token_squared[n]) > 0 for n in names)
    probe.save(str(tmp_path), 0)
    probe.save(str(tmp_path), 1)  # as if a second rank had seen the same batch
    merged = ProbeStatistics()
    merged.load(str(tmp_path), process_rank=0, world_size=1, devices={n: torch.device("cpu") for n in names})
    for name in names:
        torch.testing.assert_close(merged.token_squared[name], 2 * probe.token_squared[name])
        torch.testing.assert_close(merged.squared_grads[name], 2 * probe.squared_grads[name])


def test_an_overflowing_step_leaves_the_probe_statistics_finite():
    # Under fp16 a loss scale too large gives inf gradients to a step the optimizer skips.
    model = model_with_qkv_biases("opt", 0.02)
    names = find_biases(model).names(("k", "v"))
    params = dict(model.named_parameters())
    probe = ProbeStatistics()
    probe.track({n: params[n] for n in names}, {n: params[n].shape for n in names})
    probe.track_tokens(model, names)
    batch = {"input_ids": torch.randint(3, 64, (4, 8)), "labels": torch.tensor([0, 1, 0, 1])}
    (model(**batch).loss * 1e39).backward()  # past float32's range: inf and nan gradients
    model.zero_grad()
    model(**batch).loss.backward()
    probe.stop()
    for name in names:
        assert torch.isfinite(probe.squared_grads[name]).all() and float(probe.squared_grads[name].sum()) > 0
        assert torch.isfinite(probe.token_squared[name]).all() and float(probe.token_squared[name]) > 0
