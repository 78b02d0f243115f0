"""Resume: a checkpoint only continues the run that made it; the final model is what the report says."""

from __future__ import annotations

import itertools
import json
import logging

import pytest
import torch
from helpers import TokenDataset, snapshot, tiny_bert, training_args

from beft_trainer import REPORT_NAME, BeftConfig, BeftTrainer, BiasSelectionCallback
from beft_trainer.errors import ResumeError
from beft_trainer.probe import ProbeStatistics, probe_file_name


def _checkpointing_args(output_dir, **overrides):
    defaults = dict(max_steps=8, save_strategy="steps", save_steps=2, per_device_train_batch_size=4)
    return training_args(output_dir, **(defaults | overrides))


def _selection_run(output_dir, **options):
    options = {"probe_steps": 4} | options
    return BeftTrainer(
        tiny_bert(),
        _checkpointing_args(output_dir),
        train_dataset=TokenDataset(),
        callbacks=[BiasSelectionCallback(**options)],
    )


@pytest.mark.parametrize(
    ("checkpoint_step", "options", "setting"),
    [
        (2, {"probe_steps": 2}, "selection.probe_steps: checkpoint 4, this run 2"),
        (6, {"candidates": ("q", "k")}, "selection.candidates"),
        (2, {"score": "fisher"}, "selection.score"),
        (6, {"rewind": False}, "selection.rewind"),
    ],
)
def test_resume_with_other_selection_settings_is_refused(checkpoint_step, options, setting, tmp_path):
    _selection_run(tmp_path).train()
    resumed = _selection_run(tmp_path, **options)
    before = snapshot(resumed.model)
    with pytest.raises(ResumeError, match=setting):
        resumed.train(resume_from_checkpoint=str(tmp_path / f"checkpoint-{checkpoint_step}"))
    assert resumed.state.global_step == 0
    assert all(torch.equal(before[n], p) for n, p in resumed.model.named_parameters())


def test_resume_without_the_callback_it_was_made_with_is_refused(tmp_path):
    _selection_run(tmp_path).train()
    plain = BeftTrainer(tiny_bert(), _checkpointing_args(tmp_path), train_dataset=TokenDataset())
    with pytest.raises(ResumeError, match="selection"):
        plain.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))


def test_resume_with_other_fixed_bias_types_is_refused(tmp_path):
    def run(bias_types):
        config = BeftConfig(bias_types=bias_types)
        return BeftTrainer(
            tiny_bert(), _checkpointing_args(tmp_path), beft_config=config, train_dataset=TokenDataset()
        )

    run(("v",)).train()
    with pytest.raises(ResumeError, match="beft_config.bias_types: checkpoint \\['v'\\], this run \\['q', 'v'\\]"):
        run(("q", "v")).train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    run(("v",)).train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))  # the same settings resume


def _fixed_run(output_dir, **config):
    config = BeftConfig(bias_types=("v",), **config)
    return BeftTrainer(tiny_bert(), _checkpointing_args(output_dir), beft_config=config, train_dataset=TokenDataset())


def test_resume_with_another_head_is_refused_by_its_parameters(tmp_path):
    _fixed_run(tmp_path, head_modules=("classifier", "bert.pooler.dense.bias")).train()
    with pytest.raises(ResumeError, match="head_parameters: checkpoint \\[.*'bert.pooler.dense.bias'"):
        _fixed_run(tmp_path).train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


def test_resume_with_another_base_model_is_refused(tmp_path):
    # The Trainer would load the checkpoint's weights, while the adapter's deltas and its recorded base came
    # from the model given: the adapter would then not reproduce the trained model on either base.
    def run(seed):
        config = BeftConfig(bias_types=("v",))
        model = tiny_bert(seed=seed)
        return BeftTrainer(model, _checkpointing_args(tmp_path), beft_config=config, train_dataset=TokenDataset())

    run(seed=0).train()
    with pytest.raises(ResumeError, match="trained from another base model"):
        run(seed=1).train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    run(seed=0).train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


def test_a_setting_an_older_checkpoint_does_not_record_is_not_compared(tmp_path, caplog):
    _fixed_run(tmp_path).train()
    path = tmp_path / "checkpoint-4" / "beft_run.json"
    settings = json.loads(path.read_text())
    del settings["head_parameters"]
    path.write_text(json.dumps(settings))
    with caplog.at_level(logging.WARNING, logger="beft_trainer.resume"):
        _fixed_run(tmp_path).train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert "does not record head_parameters: not compared" in caplog.text


def test_resume_true_takes_the_last_checkpoint_and_checks_it(tmp_path):
    _selection_run(tmp_path).train()
    with pytest.raises(ResumeError, match="selection.top_k"):
        _selection_run(tmp_path, top_k=2).train(resume_from_checkpoint=True)


def _decreasing_metric():
    calls = itertools.count()

    def compute_metrics(eval_prediction):
        return {"score": 10.0 - next(calls)}  # the first evaluation (a probing one) is the best

    return compute_metrics


def test_best_model_at_end_is_never_a_probing_checkpoint(tmp_path):
    selection = BiasSelectionCallback(probe_steps=4)
    args = _checkpointing_args(
        tmp_path,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="score",
        greater_is_better=True,
    )
    trainer = BeftTrainer(
        tiny_bert(),
        args,
        train_dataset=TokenDataset(),
        eval_dataset=TokenDataset(size=8),
        compute_metrics=_decreasing_metric(),
        callbacks=[selection],
    )
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-4")
    final = snapshot(trainer.model)
    for name in trainer.bias_layout.names(trainer.frozen_groups):
        assert torch.equal(final[name], trainer.pretrained_biases[name]), f"{name} is not what the report says"
    adapter = trainer.build_adapter()
    with open(tmp_path / REPORT_NAME) as f:
        report = json.load(f)
    assert adapter.metadata.selected == report["selected"] == selection.selected
    assert sorted(adapter.metadata.bias_groups) == sorted(selection.selected)


def _write_probe_file(folder, process_rank, value, count):
    stats = ProbeStatistics()
    stats.squared_grads = {"layer.bias": torch.full((3,), value)}
    stats.grad_counts = {"layer.bias": count}
    stats.save(str(folder), process_rank)


def test_probe_statistics_of_every_rank_are_merged_on_fewer_processes(tmp_path, caplog):
    _write_probe_file(tmp_path, 0, 1.0, 2)
    _write_probe_file(tmp_path, 1, 5.0, 3)
    _write_probe_file(tmp_path, 2, 7.0, 4)
    devices = {"layer.bias": torch.device("cpu")}
    one = ProbeStatistics()
    with caplog.at_level(logging.WARNING, logger="beft_trainer.probe"):
        one.load(str(tmp_path), process_rank=0, world_size=1, devices=devices)
    assert torch.equal(one.squared_grads["layer.bias"], torch.full((3,), 13.0)) and one.grad_counts["layer.bias"] == 9
    assert "3 processes, this run has 1" in caplog.text
    second = ProbeStatistics()
    second.load(str(tmp_path), process_rank=1, world_size=2, devices=devices)  # takes old rank 1 only
    assert torch.equal(second.squared_grads["layer.bias"], torch.full((3,), 5.0))
    assert second.grad_counts["layer.bias"] == 3
    assert (tmp_path / probe_file_name(2)).is_file()


def test_resume_on_one_process_uses_a_second_ranks_statistics(tmp_path):
    _selection_run(tmp_path / "run").train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    reference = _selection_run(tmp_path / "run")
    reference.train(resume_from_checkpoint=str(checkpoint))
    reference_fisher = reference.selection_callback.report.scores["v"]["fisher"]
    # As if a second process had probed the same batches: its file doubles the checkpoint's sums.
    (checkpoint / probe_file_name(1)).write_bytes((checkpoint / probe_file_name(0)).read_bytes())
    merged = _selection_run(tmp_path / "run")
    merged.train(resume_from_checkpoint=str(checkpoint))
    assert merged.selection_callback.report.scores["v"]["fisher"] != reference_fisher
