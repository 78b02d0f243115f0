"""The selection report: every score of every candidate, the decision, and its plot."""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from .biases import SCALING_TYPES, BiasLayout
from .errors import ReportError
from .json_fields import is_number, is_object, is_str_list, required_fields
from .scores import (
    attribution_score,
    fisher_score,
    magnitude_score,
    movement_score,
    projection_score,
    random_score,
)

#: File name of the report in ``args.output_dir``.
REPORT_NAME = "beft_selection.json"
#: File name of the report's plot in ``args.output_dir``.
PLOT_NAME = "beft_selection.png"

#: The scores computed for every candidate, whichever one decides.
REPORTED_SCORES = ("projection", "magnitude", "movement", "fisher", "attribution", "random")


def by_layer(score: str, layers: Sequence[int], per_vector: Sequence[float]) -> dict[str, float]:
    """One value per layer (a JSON key) from one value per vector of the type.

    A layer may hold several vectors of one type (``ln``: two LayerNorms; a gated MLP's ``mlp_in``: gate
    and up): they combine as the type's score combines its vectors, a sum for ``movement``, a mean otherwise.
    """
    grouped: dict[int, list[float]] = {}
    for layer, value in zip(layers, per_vector, strict=True):
        grouped.setdefault(layer, []).append(value)
    combine = sum if score == "movement" else statistics.fmean
    return {str(layer): combine(values) for layer, values in grouped.items()}


@dataclass
class SelectionReport:
    """What the selection saw and decided; ``to_dict()`` is the ``beft_selection.json`` schema.

    ``scores[type]`` holds every score (overall and ``per_layer``: one value per layer, see ``by_layer``),
    the type's ``kind`` (``bias`` or ``scale``) and its size in ``parameters``.
    """

    model_type: str
    candidates: list[str]
    scores: dict[str, dict[str, Any]]
    selected: list[str] = field(default_factory=list)
    score: str = "projection"
    probe_steps: int = 0
    step: int = 0
    inert: dict[str, str] = field(default_factory=dict)
    rewind: bool = True
    trainable_parameters: dict[str, int] = field(default_factory=dict)
    budget: int | None = None
    #: Base rates of the candidates while probing and of the kept types after the switch (before the schedule).
    learning_rates: dict[str, float] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        layout: BiasLayout,
        candidates: Sequence[str],
        pretrained: dict[str, torch.Tensor],
        trained: dict[str, torch.Tensor],
        squared_grads: dict[str, torch.Tensor],
        grad_counts: dict[str, int],
        seed: int,
        attribution: dict[str, float] | None = None,
    ) -> SelectionReport:
        """Score every candidate type with every score, per layer and overall."""
        scores = {}
        for bias_type in candidates:
            vectors = layout.vectors[bias_type]
            names = [v.name for v in vectors]
            layers = [v.layer for v in vectors]
            pre, post = [pretrained[n] for n in names], [trained[n] for n in names]
            results = {
                "projection": projection_score(pre, post),
                "magnitude": magnitude_score(pre, post),
                "movement": movement_score(pre, post),
                "fisher": fisher_score([squared_grads[n] for n in names], [grad_counts[n] for n in names]),
                "attribution": attribution_score([(attribution or {}).get(n, 0.0) for n in names]),
                "random": random_score(bias_type, len(names), seed),
            }
            entry: dict[str, Any] = {name: value for name, (value, _) in results.items()}
            entry["kind"] = "scale" if bias_type in SCALING_TYPES else "bias"
            entry["parameters"] = sum(trained[n].numel() for n in names)
            entry["per_layer"] = {
                name: by_layer(name, layers, per_vector) for name, (_, per_vector) in results.items()
            }
            scores[bias_type] = entry
        return cls(model_type=layout.model_type, candidates=list(candidates), scores=scores)

    def record_decision(
        self,
        *,
        selected: list[str],
        score: str,
        probe_steps: int,
        step: int,
        inert: dict[str, str],
        rewind: bool,
        trainable_parameters: dict[str, int],
        budget: int | None = None,
        learning_rates: dict[str, float] | None = None,
    ) -> None:
        """Record what was decided, at which step, the trainable parameter counts and rates around the switch."""
        self.selected = list(selected)
        self.score = score
        self.probe_steps = probe_steps
        self.step = step
        self.inert = dict(inert)
        self.rewind = rewind
        self.trainable_parameters = dict(trainable_parameters)
        self.budget = budget
        self.learning_rates = dict(learning_rates or {})

    def type_scores(self, score: str) -> dict[str, float]:
        """``{bias_type: value}`` of one score."""
        return {t: self.scores[t][score] for t in self.candidates}

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready report."""
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> SelectionReport:
        """Inverse of ``to_dict``."""
        return cls(**payload)

    def log_metrics(self) -> dict[str, float]:
        """Flat numeric metrics for the Trainer's loggers (TensorBoard, W&B, ...)."""
        metrics = {
            f"beft/{t}/{s}": float(self.scores[t][s])
            for t in self.candidates
            for s in REPORTED_SCORES
            if s in self.scores[t]  # reports written before a score existed lack it
        }
        metrics |= {f"beft/{t}/selected": float(t in self.selected) for t in self.candidates}
        metrics |= {f"beft/{t}/inert": float(t in self.inert) for t in self.candidates}
        if self.trainable_parameters:
            metrics["beft/trainable_parameters"] = float(self.trainable_parameters["after"])
        return metrics

    def summary(self) -> str:
        """One line for humans."""
        ranked = ", ".join(
            f"{t}={self.scores[t][self.score]:.4g}" + (" (inert)" if t in self.inert else "") for t in self.candidates
        )
        share = ""
        if self.trainable_parameters.get("total"):
            share = f"; {self.trainable_parameters['after']:,} trainable parameters " + (
                f"({100 * self.trainable_parameters['after'] / self.trainable_parameters['total']:.4f}% of the model)"
            )
        return f"BEFT selected {'+'.join(self.selected)} at step {self.step} by {self.score} [{ranked}]{share}"


def write_report(report: SelectionReport, path: str) -> None:
    """Write the report as JSON to ``path``."""
    with open(path, "w") as f:
        json.dump(report.to_dict(), f, indent=2)


def read_report(path: str | os.PathLike) -> SelectionReport:
    """Read a ``beft_selection.json``, or the training ``output_dir`` that holds one.

    Raises ``ReportError`` (one line) for a missing file, a file that is not the report's JSON
    (not JSON, unknown or missing fields), any field the summary or the plot reads being missing
    or mistyped, and selected or inert types that are not among the candidates.
    """
    report_path = _report_file(os.fspath(path))
    try:
        with open(report_path, encoding="utf-8") as f:
            payload = json.load(f)
    except ValueError as error:  # not JSON, or not UTF-8
        raise ReportError(f"{report_path} is not a BEFT selection report: {error}") from error
    problem = _fields_problem(payload)
    if problem:
        raise ReportError(f"{report_path} is not a BEFT selection report: {problem}.")
    report = SelectionReport.from_dict(payload)
    problem = _report_problem(report)
    if problem:
        raise ReportError(f"{report_path} is not a complete BEFT selection report: {problem}.")
    return report


def _report_file(path: str) -> str:
    if not os.path.exists(path):
        raise ReportError(f"{path} does not exist.")
    report_path = os.path.join(path, REPORT_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(report_path):
        raise ReportError(
            f"No {REPORT_NAME} in {path}: it is written by BiasSelectionCallback at the switch "
            "(training with BeftTrainer(..., callbacks=[BiasSelectionCallback(...)]))."
        )
    return report_path


def _fields_problem(payload: Any) -> str | None:
    """What keeps ``payload`` from being ``SelectionReport`` fields, or None."""
    if not isinstance(payload, dict):
        return f"it holds a JSON {type(payload).__name__}, not an object"
    unknown = sorted(set(payload) - {f.name for f in fields(SelectionReport)})
    missing = [name for name in required_fields(SelectionReport) if name not in payload]
    if unknown or missing:
        return f"unknown fields {unknown[:5]}" if unknown else f"it lacks the fields {missing}"
    return None


#: What the fields the summary and the plot read must hold (``json_fields``' table style).
_FIELD_CHECKS = {
    "candidates": (is_str_list, "a list of bias types"),
    "selected": (is_str_list, "a list of bias types"),
    "scores": (is_object, "an object"),
    "inert": (is_object, "an object"),
    "trainable_parameters": (is_object, "an object"),
}


def _report_problem(report: SelectionReport) -> str | None:
    """What is missing or mistyped among the fields the summary and the plot read, or None."""
    for field_name, (check, expected) in _FIELD_CHECKS.items():
        if not check(getattr(report, field_name)):
            return f"{field_name!r} must be {expected}"
    for field_name in ("selected", "inert"):
        strangers = [t for t in getattr(report, field_name) if t not in report.candidates]
        if strangers:
            return f"{field_name!r} names {strangers[0]!r}, which is not among the candidates {report.candidates}"
    counts = report.trainable_parameters
    if not all(is_number(v) for v in counts.values()) or ("total" in counts and "after" not in counts):
        return "'trainable_parameters' must map 'before', 'after' and 'total' to numbers"
    if not isinstance(report.score, str) or report.score not in REPORTED_SCORES:
        return f"'score' must be one of {', '.join(REPORTED_SCORES)}, not {report.score!r}"
    for bias_type in report.candidates:
        problem = _scores_problem(bias_type, report.scores.get(bias_type), report.score)
        if problem:
            return problem
    return None


def _scores_problem(bias_type: str, scores: Any, deciding: str) -> str | None:
    if not isinstance(scores, dict):
        return f"no scores for candidate {bias_type!r}"
    # Reports written before a score existed lack it; a score present must be a number (the plot draws it).
    needed = {"projection", "magnitude", "fisher", deciding} | set(scores)
    for name in [s for s in REPORTED_SCORES if s in needed]:
        if not is_number(scores.get(name)):
            return f"scores[{bias_type!r}] lacks a numeric {name!r} score"
    if "parameters" in scores and not is_number(scores["parameters"]):
        return f"scores[{bias_type!r}]['parameters'] must be a number"
    per_layer = scores.get("per_layer", {})
    if not isinstance(per_layer, dict) or not all(_is_layer_map(values) for values in per_layer.values()):
        return f"scores[{bias_type!r}]['per_layer'] must map each score to {{layer index: number}}"
    return None


def _is_layer_map(values: Any) -> bool:
    return isinstance(values, dict) and all(k.isdecimal() and is_number(v) for k, v in values.items())
