"""Prompt-based fine-tuning of a causal LM (OPT, GPT-2, Qwen2) with BEFT, as in the BEFT paper's OPT runs (MeZO's setup).

k sampled training examples, a prompt template with label words, classification by the label
words' log-likelihood, accuracy on held-out examples. Launch with DeepSpeed:
    deepspeed recipes/run_opt.py --deepspeed ds_configs/zero2.json --model_name_or_path facebook/opt-1.3b \
        --task_name sst2 --output_dir outputs/opt-1.3b-sst2 --bf16
or without it (``accelerate launch recipes/run_opt.py ...``, or ``python recipes/run_opt.py ...``).
A .json/.yaml file of arguments may come first; later arguments override it. Data: ``--train_file/
--validation_file``, else ``--data_dir`` (``<data_dir>/<task>/{train,validation}.jsonl``, e.g.
../shared/data/glue), else the Hub. Every option: ``--help``. Wrong options or data, a model that is
not a causal decoder or cannot load, a missing ``--resume_from_checkpoint``: one line on stderr and
exit status 2. ``--resume_from_checkpoint OUTPUT_DIR/checkpoint-N`` resumes.
Writes ``eval_results.json`` (zero-shot and final accuracy, trainable parameters) and for
``--method beft`` the selection report ``beft_selection.json`` to ``--output_dir``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, set_seed

from beft_trainer import BeftConfig, SelectionConfig
from beft_trainer.errors import BeftConfigError
from beft_trainer.recipes_support import (
    DECODER_LEARNING_RATES,
    IGNORE_INDEX,
    DataArguments,
    MethodArguments,
    RecipeTrainingArguments,
    build_trainer,
    check_causal_config,
    check_causal_model,
    check_probe_fits,
    encode_for_training,
    exit_on_usage_error,
    finish_run,
    get_prompt_task,
    label_word_accuracy,
    label_word_evaluation,
    load_pretrained,
    load_prompt_task,
    load_tokenizer,
    model_source,
    parse_recipe_args,
    resume_checkpoint,
    sample_examples,
    start_processes,
    stop_processes,
    train_or_resume,
)
from beft_trainer.recipes_support.decoders import plain_copy


@dataclass
class ModelArguments:
    """Which causal LM to fine-tune."""

    model_name_or_path: str = field(
        default="facebook/opt-1.3b",
        metadata={"help": "Hub id or local folder (with --gguf_file: the folder that holds the GGUF file)."},
    )
    gguf_file: str | None = field(
        default=None,
        metadata={
            "help": "A GGUF file inside --model_name_or_path, dequantised on load (needs the 'gguf' package; "
            "slow: convert once with python -m beft_trainer.recipes_support.decoders)."
        },
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's."})
    dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype the weights load in. Only float32: trained parameters need fp32 (a checkpoint's own "
            "float16 would train without a master copy); keep frozen weights in bf16 with --frozen_dtype and --bf16."
        },
    )

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "fp32"):
            raise BeftConfigError(
                f"--dtype {self.dtype}: trained parameters must be fp32; load in float32 and store the frozen "
                "weights in half precision with --frozen_dtype bfloat16 --bf16 (bias methods)."
            )


@dataclass
class PromptDataArguments(DataArguments):
    """Which task and how many examples (MeZO: k=1000 train, 1000 held-out)."""

    task_name: str = field(default="sst2", metadata={"help": "sst2, rte, cb, boolq or wic."})
    max_train_samples: int | None = field(
        default=1000, metadata={"help": "k: training examples sampled with the seed."}
    )
    max_eval_samples: int | None = field(default=1000, metadata={"help": "Held-out examples to score."})
    max_seq_length: int = field(
        default=256, metadata={"help": "Truncate prompts (from the left) to this many tokens."}
    )


@dataclass
class PromptTrainingArguments(RecipeTrainingArguments):
    """``RecipeTrainingArguments`` with the decoders' default learning rates (``DECODER_LEARNING_RATES``)."""

    model_kind: ClassVar[str] = "decoder"
    learning_rate: float | None = field(
        default=None,
        metadata={"help": f"Peak learning rate. Default: per method, for decoders: {DECODER_LEARNING_RATES}."},
    )


@exit_on_usage_error
def main(argv: list[str] | None = None) -> dict:
    """Run the recipe; returns the results written to ``eval_results.json``."""
    model_args, data_args, method_args, selection_config, beft_config, training_args = parse_recipe_args(
        (ModelArguments, PromptDataArguments, MethodArguments, SelectionConfig, BeftConfig, PromptTrainingArguments),
        argv,
    )
    check_probe_fits(selection_config, method_args, training_args)
    task = get_prompt_task(data_args.task_name)
    checkpoint = resume_checkpoint(training_args)
    start_processes(training_args)
    set_seed(training_args.seed)
    gguf = {"gguf_file": model_args.gguf_file} if model_args.gguf_file else {}
    model_path = model_source(model_args.model_name_or_path, gguf_file=model_args.gguf_file)
    check_causal_config(model_path, **gguf)  # an encoder would see the label word it is scored on
    tokenizer = load_tokenizer(AutoTokenizer, model_args.tokenizer_name, model_path, **gguf)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has none; padded positions are masked anyway
    sample_seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
    # The data is read and checked before the model loads: a bad file costs no model load and writes nothing.
    with training_args.main_process_first(desc="loading and encoding"):
        raw = load_prompt_task(task, data_args.train_file, data_args.validation_file, data_args.data_dir)
        train = sample_examples(raw["train"], data_args.max_train_samples, sample_seed)
        held_out = sample_examples(raw["validation"], data_args.max_eval_samples, sample_seed)
        gold = [int(label) for label in held_out["label"]]
        train = encode_for_training(train, tokenizer, task, data_args.max_seq_length)
        held_out, score_label_words = label_word_evaluation(held_out, tokenizer, task, data_args.max_seq_length)
    # TrainingArguments exist already, so under ZeRO-3 the weights load partitioned.
    model = load_pretrained(AutoModelForCausalLM, model_path, dtype=torch.float32, **gguf)
    if gguf:
        model = plain_copy(model)  # the Trainer refuses a GGUF-loaded model as quantized
    check_causal_model(model, model_path)
    trainer = build_trainer(
        model,
        training_args,
        method_args,
        selection_config,
        beft_config,
        peft_task_type="CAUSAL_LM",
        train_dataset=train,
        eval_dataset=held_out,
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX),
        compute_metrics=label_word_accuracy(gold, len(task.label_words)),
        preprocess_logits_for_metrics=score_label_words,
        processing_class=tokenizer,
    )
    train_or_resume(trainer, checkpoint)
    results = finish_run(trainer, method_args, "accuracy", task=task.name, model=model_path)
    stop_processes()
    return results


if __name__ == "__main__":
    main()
