"""The switch ablation sends back exactly what its variant names, at the switch, and nothing else."""

from __future__ import annotations

import json
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


def _record(method, seed, score, variant=None, selected=None, config=None):
    record = {"task": "cola", "method": method, "seed": seed, "score": score, "steps": 1000, "train_loss": 0.5}
    record |= {"metric": "matthews_correlation", "selected": selected, "config": config, "model": "minilm"}
    return record | ({"variant": variant} if variant else {})


def test_the_report_sets_each_rewind_beside_the_selection_and_its_kept_type_alone(tmp_path):
    head = {"head_modules": ["classifier"]}
    family = [_record("auto_family_0.02%", s, 0.1 * (s + 1), selected=["mlp_out"], config=head) for s in (0, 1)]
    family += [_record("mlp_out", s, 0.05, config=head) for s in (0, 1, 2)]
    family += [_record("mlp_out", 0, 0.9)]  # another head: not this setting
    ablation = [_record("auto_family_0.02%", 0, 0.02, v, ["mlp_out"], head) for v in switch_ablation.VARIANTS]
    ablation.append(_record("auto_family_0.02%", 1, 0.03, "rewind_head", ["mlp_out"], head))
    paths = {"family": tmp_path / "family.jsonl", "runs": tmp_path / "ablation.jsonl"}
    for name, records in (("family", family), ("runs", ablation)):
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "report"
    arguments = ["report", "--runs", str(paths["runs"]), "--family-runs", str(paths["family"]), "--out", str(out)]
    switch_ablation.main(arguments)
    rows = {r["variant"].split(":")[0]: r for r in json.loads((tmp_path / "report.json").read_text())}
    # Each row is paired with the selection on the seeds both ran: mlp_out's seed 2 has no selection to meet.
    expected = {
        "selection (head and kept types go on)": ([0, 1], 15.0, 0.0),
        "mlp_out trained alone": ([0, 1], 5.0, -10.0),
        "`rewind_head`": ([0, 1], 2.5, -12.5),
        "`rewind_kept`": ([0], 2.0, -8.0),
        "`rewind_both`": ([0], 2.0, -8.0),
    }
    got = {k: (r["seeds"], round(r["mean"], 6), round(r["difference"], 6)) for k, r in rows.items()}
    assert got == expected
    assert (
        rows["`rewind_head`"]["standard_error"] == pytest.approx(4.5)
        and rows["`rewind_kept`"]["standard_error"] is None
    )
    assert (
        "| `rewind_head`: the head back to its initial values at the switch | 0, 1 | 2.5 | 15.0 | -12.5 ± 4.5 |"
        in (tmp_path / "report.md").read_text()
    )
    with pytest.raises(SystemExit, match="give --family-runs"):
        switch_ablation.main(arguments[:3])
