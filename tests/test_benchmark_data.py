"""The studies on a machine without ``datasets`` or scikit-learn (the GPU image) train and score alike."""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest
from helpers import TokenDataset, tiny_bert, training_args
from transformers import AutoTokenizer

from beft_trainer import BeftTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_benchmarks_common():
    spec = importlib.util.spec_from_file_location("benchmarks_common", os.path.join(ROOT, "benchmarks", "common.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


common = _load_benchmarks_common()


def _without(monkeypatch, *packages: str) -> None:
    """Make ``common`` see ``packages`` as not installed."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        common.importlib.util, "find_spec", lambda name, *a: None if name in packages else find_spec(name, *a)
    )


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(common.model_path()))


@pytest.mark.realdata
@pytest.mark.parametrize("task", ["sst2", "rte", "cola"])
def test_without_datasets_the_study_trains_on_the_same_features(task, tokenizer, monkeypatch):
    expected = common.load_task(task, tokenizer, train_size=40, seed=3, max_length=64)
    _without(monkeypatch, "datasets")
    train, validation = common.load_task(task, tokenizer, train_size=40, seed=3, max_length=64)
    assert isinstance(train, list) and len(train) == 40
    for got, want in ((train, expected[0]), (validation, expected[1])):
        assert len(got) == len(want) > 0
        assert got == [dict(row) for row in want]
    other_seed, _ = common.load_task(task, tokenizer, train_size=40, seed=4, max_length=64)
    assert other_seed != train


@pytest.mark.realdata
def test_without_datasets_the_whole_split_is_kept_when_the_size_exceeds_it(tokenizer, monkeypatch):
    _without(monkeypatch, "datasets")
    train, _ = common.load_task("rte", tokenizer, train_size=10**6, seed=0, max_length=32)
    with open(common.DATA / "rte" / "train.jsonl") as f:
        assert len(train) == sum(1 for line in f if line.strip())


@pytest.mark.parametrize("task", ["sst2", "cola"])
def test_without_sklearn_the_metric_is_the_same(task, monkeypatch):
    rng = np.random.default_rng(0)
    cases = [(rng.integers(0, 2, 300), rng.integers(0, 2, 300)) for _ in range(5)]
    cases += [(np.ones(50, dtype=int), rng.integers(0, 2, 50)), (np.array([0, 1, 1, 0]), np.array([0, 1, 1, 0]))]
    expected = [common.metric(task, predictions, labels) for predictions, labels in cases]
    _without(monkeypatch, "sklearn")
    got = [common.metric(task, predictions, labels) for predictions, labels in cases]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert len(set(np.round(got, 6))) > 2


def test_a_metric_without_a_numpy_form_is_refused():
    with pytest.raises(SystemExit, match="only accuracy and matthews_correlation"):
        common.numpy_metric("pearson", np.zeros(3), np.zeros(3))


def test_a_study_model_folder_without_weights_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("BEFT_STUDY_MODEL", str(tmp_path))
    with pytest.raises(SystemExit, match="no config.json"):
        common.model_path()


def test_a_study_run_prints_its_progress(tmp_path, capsys):
    args = training_args(tmp_path, max_steps=20)
    trainer = BeftTrainer(tiny_bert(), args, train_dataset=TokenDataset())
    trainer.add_callback(common.progress_lines("tiny sst2 v seed 0", steps=20, lines=4))
    trainer.train()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("tiny sst2 v seed 0:")]
    assert [line.split(",")[0] for line in lines] == [f"tiny sst2 v seed 0: step {s}/20" for s in (5, 10, 15, 20)]
    assert lines[-1].endswith("~0 min left")
