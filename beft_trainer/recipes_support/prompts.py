"""Prompt-based classification with a causal LM, as in MeZO (the BEFT paper's OPT setup).

Each example becomes a prompt followed by a label word ("It was great"). Training maximises the
log-likelihood of the gold label word; evaluation scores every label word's log-likelihood after
the prompt and predicts the most likely one. Templates and label words follow MeZO's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import BeftConfigError
from .data import SplitSpec, load_splits

#: Label value of tokens that do not count in the loss (the prompt and the padding).
IGNORE_INDEX = -100


@dataclass(frozen=True)
class PromptTask:
    """A classification task as a prompt: template fields, accepted column names, label words by label id."""

    name: str
    hub: tuple[str, str]
    fields: dict[str, tuple[str, ...]]
    template: str
    label_words: tuple[str, ...]

    def render(self, example: dict[str, Any]) -> str:
        """The prompt of one example (without its label word)."""
        return self.template.format(**{name: _field(example, name, columns) for name, columns in self.fields.items()})

    def split_spec(self) -> SplitSpec:
        """What each data split must hold: a column for every template field, and labels ``0..len(label_words)-1``."""
        return SplitSpec(self.name, tuple(self.fields.values()), len(self.label_words))


def _field(example: dict[str, Any], name: str, columns: tuple[str, ...]) -> str:
    # GLUE and SuperGLUE spell the same field differently (RTE: sentence1 vs premise).
    for column in columns:
        if column in example:
            return str(example[column]).strip()
    raise BeftConfigError(f"Example has no column for {name!r} (tried {columns}).")


_NLI_TEMPLATE = '{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n'
_PREMISE = ("premise", "sentence1")
_HYPOTHESIS = ("hypothesis", "sentence2")

#: The tasks of the BEFT paper's OPT experiments (MeZO's templates and label words).
PROMPT_TASKS: dict[str, PromptTask] = {
    "sst2": PromptTask(
        "sst2", ("nyu-mll/glue", "sst2"), {"sentence": ("sentence",)}, "{sentence} It was", ("terrible", "great")
    ),
    "rte": PromptTask(
        "rte",
        ("aps/super_glue", "rte"),
        {"premise": _PREMISE, "hypothesis": _HYPOTHESIS},
        _NLI_TEMPLATE,
        ("Yes", "No"),
    ),
    "cb": PromptTask(
        "cb",
        ("aps/super_glue", "cb"),
        {"premise": _PREMISE, "hypothesis": _HYPOTHESIS},
        _NLI_TEMPLATE,
        ("Yes", "No", "Maybe"),
    ),
    "boolq": PromptTask(
        "boolq",
        ("aps/super_glue", "boolq"),
        {"passage": ("passage",), "question": ("question",)},
        "{passage} {question}?",
        ("No", "Yes"),
    ),
    "wic": PromptTask(
        "wic",
        ("aps/super_glue", "wic"),
        {"word": ("word",), "sentence1": ("sentence1",), "sentence2": ("sentence2",)},
        'Does the word "{word}" have the same meaning in these two sentences? Yes, No?\n{sentence1}\n{sentence2}\n',
        ("No", "Yes"),
    ),
}


def get_prompt_task(task_name: str) -> PromptTask:
    """The prompt spec of a task by name (``sst2``, ``rte``, ``cb``, ``boolq``, ``wic``)."""
    key = task_name.lower()
    if key not in PROMPT_TASKS:
        raise BeftConfigError(
            f"--task_name {task_name!r}: unknown prompt task; choose one of {', '.join(PROMPT_TASKS)}."
        )
    return PROMPT_TASKS[key]


def load_prompt_task(
    task: PromptTask,
    train_file: str | None = None,
    validation_file: str | None = None,
    data_dir: str | os.PathLike | None = None,
):
    """Checked ``train``/``validation`` splits: explicit files, else ``data_dir/<task>/``, else the Hub."""
    return load_splits(task.split_spec(), task.hub, "validation", train_file, validation_file, data_dir)


# -- encoding -----------------------------------------------------------------------------------


def encode_prompt_answer(tokenizer, prompt: str, answer: str, max_length: int) -> dict[str, list[int]]:
    """Token ids of ``prompt`` + label word, with ``labels`` set on the label word's tokens only.

    The prompt is truncated from the left so the label word always fits; the tokenizer's BOS
    token (OPT's ``</s>``) starts the sequence as in pre-training.
    """
    separator = "" if prompt.endswith("\n") else " "
    answer_ids = tokenizer(separator + answer, add_special_tokens=False)["input_ids"]
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    room = max_length - len(prefix) - len(answer_ids)
    if room < 1:
        raise BeftConfigError(f"max_seq_length={max_length} leaves no room for the prompt.")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][-room:]
    input_ids = prefix + prompt_ids + answer_ids
    labels = [IGNORE_INDEX] * (len(prefix) + len(prompt_ids)) + answer_ids
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def check_prompt_room(tokenizer, task: PromptTask, max_length: int) -> None:
    """Refuse, before encoding, a ``max_length`` that leaves no token for the prompt after BOS and the label word."""
    separator = "" if task.template.endswith("\n") else " "
    prefix = 1 if tokenizer.bos_token_id is not None else 0
    longest = max(len(tokenizer(separator + w, add_special_tokens=False)["input_ids"]) for w in task.label_words)
    if max_length - prefix - longest < 1:
        raise BeftConfigError(
            f"--max_seq_length {max_length} leaves no room for the {task.name} prompt: BOS and the longest "
            f"label word take {prefix + longest} tokens; raise it."
        )


def encode_for_training(dataset, tokenizer, task: PromptTask, max_length: int):
    """Each example as its prompt followed by its gold label word."""
    check_prompt_room(tokenizer, task, max_length)

    def encode(example: dict[str, Any]) -> dict[str, list[int]]:
        return encode_prompt_answer(
            tokenizer, task.render(example), task.label_words[int(example["label"])], max_length
        )

    return dataset.map(encode, remove_columns=dataset.column_names, desc=f"Encoding {task.name} prompts")


def single_token_label_words(tokenizer, task: PromptTask) -> list[int] | None:
    """Each label word's token id when every word is one token after the prompt, else ``None``."""
    separator = "" if task.template.endswith("\n") else " "
    ids = [tokenizer(separator + word, add_special_tokens=False)["input_ids"] for word in task.label_words]
    return [word_ids[0] for word_ids in ids] if all(len(word_ids) == 1 for word_ids in ids) else None


def encode_candidates(dataset, tokenizer, task: PromptTask, max_length: int):
    """Each example once per label word, in order: row ``i * C + c`` is example ``i`` with word ``c``.

    The general path (any label words); ``label_word_evaluation`` prefers one row per example.
    """
    check_prompt_room(tokenizer, task, max_length)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        rows: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
        for i in range(len(batch["label"])):
            prompt = task.render({k: v[i] for k, v in batch.items()})
            for word in task.label_words:
                for key, value in encode_prompt_answer(tokenizer, prompt, word, max_length).items():
                    rows[key].append(value)
        return rows

    return dataset.map(
        encode, batched=True, remove_columns=dataset.column_names, desc=f"Encoding {task.name} candidates"
    )


# -- classification by label-word log-likelihood --------------------------------------------------


def answer_log_likelihood(logits: torch.Tensor | tuple, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log-probabilities of the labelled tokens of each sequence, shape ``(batch,)``.

    Used as ``preprocess_logits_for_metrics`` so the Trainer keeps one number per sequence
    instead of a ``(batch, length, vocab)`` logits tensor.
    """
    logits = logits[0] if isinstance(logits, tuple) else logits
    shifted_logits, shifted_labels = logits[:, :-1].float(), labels[:, 1:]
    mask = shifted_labels != IGNORE_INDEX
    token_log_probs = torch.log_softmax(shifted_logits, dim=-1).gather(-1, shifted_labels.clamp(min=0).unsqueeze(-1))
    return (token_log_probs.squeeze(-1) * mask).sum(-1)


def label_word_accuracy(gold_labels: list[int], num_choices: int) -> Callable[[Any], dict[str, float]]:
    """A ``compute_metrics``: predict the label word with the highest log-likelihood, score accuracy."""
    from sklearn.metrics import accuracy_score

    gold = np.asarray(gold_labels)

    def compute_metrics(eval_prediction) -> dict[str, float]:
        scores = np.asarray(eval_prediction.predictions).reshape(-1, num_choices)
        if len(scores) != len(gold):
            raise BeftConfigError(f"Got scores for {len(scores)} examples, expected {len(gold)}.")
        return {"accuracy": float(accuracy_score(gold, scores.argmax(-1)))}

    return compute_metrics


def label_word_log_likelihoods(word_ids: list[int]) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    """A ``preprocess_logits_for_metrics`` for one row per example: every label word's log-likelihood, ``(batch, C)``.

    Each row is the prompt followed by its gold word (``encode_for_training``), so the logits
    before the labelled token are the distribution over the word after the prompt: one forward
    pass scores every single-token label word, with the same numbers as one row per word.
    """
    word_index = torch.tensor(word_ids)

    def preprocess(logits: torch.Tensor | tuple, labels: torch.Tensor) -> torch.Tensor:
        logits = logits[0] if isinstance(logits, tuple) else logits
        before_answer = (labels != IGNORE_INDEX).int().argmax(-1) - 1
        rows = logits[torch.arange(len(labels), device=logits.device), before_answer].float()
        return torch.log_softmax(rows, dim=-1)[:, word_index.to(rows.device)]

    return preprocess


def label_word_evaluation(dataset, tokenizer, task: PromptTask, max_length: int):
    """The held-out rows and their ``preprocess_logits_for_metrics``, both for ``label_word_accuracy``.

    Single-token label words (SST-2, RTE with OPT, GPT-2, Qwen2 tokenizers): one row per example,
    one forward pass for all words, and the evaluation loss is the gold word's. Otherwise one row
    per example and word (``encode_candidates``).
    """
    word_ids = single_token_label_words(tokenizer, task)
    if word_ids is None:
        return encode_candidates(dataset, tokenizer, task, max_length), answer_log_likelihood
    return encode_for_training(dataset, tokenizer, task, max_length), label_word_log_likelihoods(word_ids)
