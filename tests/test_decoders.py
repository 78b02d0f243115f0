"""Decoders in run_opt.py: trained parameters in fp32, label words scored in one pass, real pretrained decoders.

The real-model tests need the converted models in the git-ignored cache (``realdata``):
    python -m beft_trainer.recipes_support.decoders prepare-qwen --cache .cache/qwen2.5-0.5b
    python -m beft_trainer.recipes_support.decoders prepare-smollm2 --cache .cache/smollm2-135m
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf
from datasets import Dataset
from helpers import qkv_coherence
from test_recipes import MINILM, common_args, run_opt, save_tiny, toy_rows

from beft_trainer import add_missing_biases, find_biases, find_inert
from beft_trainer.recipes_support import (
    IGNORE_INDEX,
    answer_log_likelihood,
    encode_candidates,
    get_prompt_task,
    label_word_evaluation,
    single_token_label_words,
)
from beft_trainer.scores import rounding_floor

REPO = Path(__file__).resolve().parents[1]
QWEN = REPO / ".cache" / "qwen2.5-0.5b" / "model"
SMOLLM2 = REPO / ".cache" / "smollm2-135m" / "model"


@pytest.fixture(scope="module")
def float16_opt_dir(tmp_path_factory) -> str:
    """A tiny OPT checkpoint whose config declares float16, as real OPT checkpoints do."""
    torch.manual_seed(0)
    config = tf.OPTConfig(
        vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32,
        word_embed_proj_dim=16, max_position_embeddings=128, pad_token_id=0,
    )  # fmt: skip
    folder = save_tiny(tf.OPTForCausalLM(config).half(), tmp_path_factory.mktemp("opt_fp16"))
    assert tf.AutoConfig.from_pretrained(folder).dtype == torch.float16
    return folder


@pytest.fixture
def toy_glue(tmp_path) -> str:
    import json

    (tmp_path / "sst2").mkdir()
    for split, (n, seed) in {"train": (16, 0), "validation": (8, 1)}.items():
        with open(tmp_path / "sst2" / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in toy_rows(n, seed))
    return str(tmp_path)


@pytest.mark.parametrize("method", ["v", "full"])
def test_trained_parameters_are_fp32_when_the_checkpoint_says_float16(
    method, float16_opt_dir, toy_glue, tmp_path, monkeypatch
):
    built = []

    def keep(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    original = run_opt.build_trainer
    monkeypatch.setattr(run_opt, "build_trainer", keep)
    argv = ["--model_name_or_path", float16_opt_dir, "--data_dir", toy_glue, "--method", method, "--bf16", "true"]
    argv += ["--max_train_samples", "16", "--max_eval_samples", "8", "--max_seq_length", "32"]
    run_opt.main([*argv, *common_args(tmp_path / "out", max_steps=2, eval_on_start="false")])
    trained = {n: p.dtype for n, p in built[0].model.named_parameters() if p.requires_grad}
    assert trained and set(trained.values()) == {torch.float32}, trained


def test_half_precision_loading_is_refused_with_the_way_out(float16_opt_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_opt.main(["--model_name_or_path", float16_opt_dir, "--dtype", "float16", "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--frozen_dtype" in capsys.readouterr().err


def predict(model, rows, preprocess, tokenizer, tmp_path) -> torch.Tensor:
    args = tf.TrainingArguments(str(tmp_path), per_device_eval_batch_size=3, use_cpu=True, report_to=[])
    collator = tf.DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX)
    trainer = tf.Trainer(model, args, data_collator=collator, preprocess_logits_for_metrics=preprocess)
    return torch.as_tensor(trainer.predict(rows).predictions)


def test_one_forward_per_example_gives_the_log_likelihoods_of_one_row_per_word(float16_opt_dir, tmp_path):
    tokenizer = tf.AutoTokenizer.from_pretrained(MINILM)
    model = tf.AutoModelForCausalLM.from_pretrained(float16_opt_dir, dtype=torch.float32)
    task = get_prompt_task("sst2")
    assert single_token_label_words(tokenizer, task) is not None
    held_out = Dataset.from_list(toy_rows(7, 3))  # 7 rows, batches of 3: padding differs per batch
    rows, preprocess = label_word_evaluation(held_out, tokenizer, task, 32)
    assert len(rows) == 7 and preprocess is not answer_log_likelihood
    fast = predict(model, rows, preprocess, tokenizer, tmp_path)
    slow = predict(model, encode_candidates(held_out, tokenizer, task, 32), answer_log_likelihood, tokenizer, tmp_path)
    slow = slow.reshape(7, len(task.label_words))
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-4)
    assert torch.equal(fast.argmax(-1), slow.argmax(-1))


# -- real pretrained decoders -------------------------------------------------------------------


def real_coherence(model, tokenizer, dtype: torch.dtype) -> dict[str, list[float]]:
    """Per type, each layer's gradient coherence on two batches of four SST-2-like prompts."""

    def backward_passes(model) -> None:
        for rows in (toy_rows(4, 0), toy_rows(4, 1)):
            texts = [f"{row['sentence']} It was {('terrible', 'great')[row['label']]}" for row in rows]
            batch = tokenizer(texts, return_tensors="pt", padding=True)
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                model(**batch, labels=labels).loss.backward()

    return qkv_coherence(model, backward_passes)


@pytest.mark.realdata
@pytest.mark.realdecoder
@pytest.mark.parametrize("folder", [QWEN, SMOLLM2], ids=["qwen2", "smollm2-llama"])
def test_no_bias_type_of_a_real_rotary_decoder_is_inert(folder):
    if not (folder / "config.json").is_file():
        pytest.fail(f"needs {folder}: python -m beft_trainer.recipes_support.decoders prepare-... (see module doc)")
    model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = tf.AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    if not find_biases(model).vectors.get("k"):
        add_missing_biases(model)  # SmolLM2 is Llama: no biases of its own
    # Qwen2 under CPU bf16 autocast takes minutes on 2 cores: its bf16 figures are in
    # benchmarks/results/real_decoder_inert_coherence.md; the tiny models test bf16 everywhere.
    for dtype in (torch.float32,) if folder == QWEN else (torch.float32, torch.bfloat16):
        coherence = real_coherence(model, tokenizer, dtype)
        assert find_inert(coherence, rounding_floor({dtype})) == {}, coherence


@pytest.mark.realdata
@pytest.mark.realdecoder
def test_run_opt_trains_added_biases_of_a_real_llama_loaded_from_gguf(tmp_path):
    gguf = SMOLLM2.parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file() or not (REPO.parent / "shared" / "data" / "glue" / "sst2").is_dir():
        pytest.fail("needs the SmolLM2 GGUF (prepare-smollm2) and ../shared/data/glue")
    argv = ["--model_name_or_path", str(gguf.parent), "--gguf_file", gguf.name, "--task_name", "sst2"]
    argv += ["--data_dir", str(REPO.parent / "shared" / "data" / "glue"), "--add_missing_biases", "true"]
    argv += ["--score", "magnitude", "--probe_steps", "2", "--max_train_samples", "16", "--max_eval_samples", "8"]
    results = run_opt.main([*argv, *common_args(tmp_path / "out", max_steps=3, per_device_train_batch_size=4)])
    # Llama-with-added-biases: rotary positions, so no added bias type is inert.
    report = json_file(tmp_path / "out" / "beft_selection.json")
    assert report["inert"] == {} and results["selected"] and len(results["selected"]) == 1
    assert results["trainable_parameters"]["trainable"] == 30 * model_width(results["selected"][0])


def json_file(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


def model_width(bias_type: str) -> int:
    """SmolLM2-135M: hidden 576, 9 heads of 64, 3 key/value heads (k and v biases are 192 wide)."""
    return 576 if bias_type == "q" else 192
