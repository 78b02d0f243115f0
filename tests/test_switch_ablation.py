"""The switch ablation sends back exactly what its variant names, at the switch, and nothing else."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import transformers as tf
from helpers import TokenDataset, snapshot, tiny_bert, training_args

from beft_trainer import BeftTrainer, BiasSelectionCallback
from beft_trainer.distributed import innermost_optimizer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import switch_ablation  # noqa: E402

HEAD = ["classifier.bias", "classifier.weight"]


class AtSwitch(tf.TrainerCallback):
    """Copies every parameter and the optimizer's state keys right after the switch (runs after the ablation)."""

    def __init__(self, trainer):
        self.trainer, self.values, self.with_state = trainer, None, None

    def on_step_end(self, args, state, control, **kwargs):
        if self.values is None and self.trainer.selection_callback.selected is not None:
            self.values = snapshot(self.trainer.model)
            optimizer = innermost_optimizer(self.trainer.optimizer)
            self.with_state = {n for n, p in self.trainer.model.named_parameters() if p in optimizer.state}
            self.step = state.global_step


@pytest.mark.parametrize("variant", sorted(switch_ablation.VARIANTS))
def test_each_variant_rewinds_what_it_names_at_the_switch_and_keeps_the_rest(variant, tmp_path):
    model = tiny_bert()
    initial = snapshot(model)
    selection = BiasSelectionCallback(probe_steps=3, candidates=["q", "v", "mlp_out"], score="magnitude")
    trainer = BeftTrainer(
        model, training_args(tmp_path, max_steps=5), train_dataset=TokenDataset(), callbacks=[selection]
    )
    trainer.add_callback(switch_ablation.RewindAtSwitch(trainer, switch_ablation.VARIANTS[variant]))
    spy = AtSwitch(trainer)
    trainer.add_callback(spy)
    trainer.train()

    (kept,) = selection.selected
    kept_names = trainer.parameter_groups[kept]
    parts = switch_ablation.VARIANTS[variant]
    assert spy.step == 3 and sorted(initial) == sorted(spy.values)
    for name in HEAD:
        assert torch.equal(spy.values[name], initial[name]) == ("head" in parts), name
        assert (name in spy.with_state) == ("head" not in parts), name
    for name in kept_names:
        assert torch.equal(spy.values[name], initial[name]) == ("kept" in parts), name
        assert (name in spy.with_state) == ("kept" not in parts), name
    frozen = [n for t in ("q", "v", "mlp_out") if t != kept for n in trainer.parameter_groups[t]]
    assert frozen and all(torch.equal(spy.values[n], initial[n]) for n in frozen)  # the library's own rewind
    # Both go on training after the switch, from wherever the variant left them.
    after = snapshot(model)
    assert all(not torch.equal(after[n], spy.values[n]) for n in HEAD + kept_names)
