"""BiasSelectionCallback: probe the candidate bias types, score them, select one, re-freeze.

Events used: ``on_init_end`` (refuses a plain Trainer), ``on_train_begin`` (validates, resumes,
starts gradient tracking; a resumed state's probing checkpoint never counts as the best model),
``on_step_end`` (the switch at ``probe_steps``), ``on_save`` (writes its state next to the
checkpoint) and ``on_train_end`` (warns when training stopped before the switch). ``BeftTrainer``
keeps evaluations while probing from counting as the best.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from transformers import TrainerCallback

from .biases import SCALING_TYPES
from .config import SelectionConfig
from .distributed import broadcast_from_main, rank, read_full_fp32, settle_zero3, world_size
from .errors import BeftConfigError
from .plot import plot_in_background
from .precision import gradient_dtypes
from .probe import ProbeStatistics
from .report import PLOT_NAME, REPORT_NAME, SelectionReport, write_report
from .resume import forget_best_before
from .scores import (
    find_inert,
    gradient_coherence,
    rank_types,
    require_rankable,
    rounding_floor,
    select_within_budget,
    settle_budget,
)
from .vectors import is_scaling_parameter

logger = logging.getLogger(__name__)

STATE_NAME = "beft_state.json"


class BiasSelectionCallback(TrainerCallback):
    """Select the bias type to fine-tune from data, inside one training run.

    Args:
        config: a ``SelectionConfig``; or pass its fields as keyword arguments
            (``BiasSelectionCallback(probe_steps=50, candidates=("q", "v"))``). Every option,
            its default and its meaning: ``SelectionConfig``.
    """

    def __init__(self, config: SelectionConfig | None = None, **options: Any) -> None:
        if config is not None and not isinstance(config, SelectionConfig):
            raise BeftConfigError(
                f"BiasSelectionCallback takes a SelectionConfig or keyword options, not {type(config).__name__}: "
                "e.g. BiasSelectionCallback(probe_steps=50)."
            )
        unknown = sorted(set(options) - set(SelectionConfig.option_names()))
        if unknown:
            raise BeftConfigError(
                f"BiasSelectionCallback got unknown options {unknown}; "
                f"known: {', '.join(SelectionConfig.option_names())}."
            )
        if config is not None and options:
            raise BeftConfigError("BiasSelectionCallback takes a SelectionConfig or keyword options, not both.")
        self.config = config if config is not None else SelectionConfig(**options)
        self.trainer = None
        self.selected: list[str] | None = None
        self.report: SelectionReport | None = None
        self.probe = ProbeStatistics()
        #: ``probe_steps`` as a count for this run (a share resolves against max_steps at train begin).
        self.probe_step_count: int | None = None
        self._budget_score: str | None = None
        self._plotting = None  # the thread drawing the report's plot (joined at train end)

    def __getattr__(self, name: str) -> Any:
        # The options read as attributes (callback.probe_steps), from the one config.
        if name != "config" and name in SelectionConfig.option_names():
            return getattr(self.config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def score(self) -> str | None:
        """The deciding score: ``config.fixed_score``, or a budget's default for this model (set at train begin)."""
        return self.config.fixed_score or self._budget_score

    def bind(self, trainer) -> None:
        """Attach to a ``BeftTrainer`` (it calls this itself) and check the candidates exist."""
        if self.trainer is not None and self.trainer is not trainer:
            raise BeftConfigError(
                "This BiasSelectionCallback already belongs to another trainer and holds its selection; "
                "create a new BiasSelectionCallback(...) for each trainer."
            )
        trainer.bias_layout.require(self.candidates)
        self.trainer = trainer

    # -- events -------------------------------------------------------------------------------

    def on_init_end(self, args, state, control, **kwargs):
        """Hook: refuse a trainer other than ``BeftTrainer``."""
        if self.trainer is None:
            raise BeftConfigError(
                "BiasSelectionCallback needs BeftTrainer, which gives each bias type its own optimizer "
                "group so the switch can freeze exactly: use BeftTrainer(model, args, callbacks=[...])."
            )

    def on_train_begin(self, args, state, control, **kwargs):
        """Hook: check the schedule and score, restore a checkpoint's selection, or start probing."""
        if self.trainer is None:
            raise BeftConfigError(
                "BiasSelectionCallback was added after the trainer was built; BeftTrainer builds one optimizer "
                "group per candidate type from it: pass it as BeftTrainer(model, args, callbacks=[...])."
            )
        self.probe_step_count = self.config.probe_step_count(state.max_steps)
        if self.probe_step_count >= state.max_steps:
            raise BeftConfigError(
                f"probe_steps={self.config.describe_probe_steps(state.max_steps)} leaves no training after the "
                f"selection (max_steps={state.max_steps}): lower probe_steps or train longer."
            )
        self._check_scoring()
        self._load_state(self.trainer.resume_checkpoint_dir)
        if self.selected is not None:
            self.trainer.freeze_groups([t for t in self.candidates if t not in self.selected])
            self._set_phase_learning_rate(args)
            forget_best_before(state, self.report.step if self.report is not None else None)
            return
        self._set_phase_learning_rate(args)
        if not self.probe.tracking:
            params = self._candidate_params()
            self.probe.track(params, {n: self.trainer.pretrained_biases[n].shape for n in params})
            # Per-token statistics exist for biases only (a bias's gradient at a token is its module's
            # output gradient); scaling vectors are never inert by construction, see _find_inert.
            self.probe.track_tokens(self.trainer.model, [n for n in params if not is_scaling_parameter(n)])
        self.probe.start_step(self._candidate_values())
        forget_best_before(state, self.report.step if self.report is not None else None)

    def on_step_end(self, args, state, control, **kwargs):
        """Hook: record the probing step; at ``probe_steps``, select, freeze and publish the report."""
        if self.selected is None:
            values = self._candidate_values()
            self.probe.end_step(values)
            if state.global_step >= self.probe_step_count:
                self._select(args, state, {n: v.cpu() for n, v in values.items()})
                self._publish(args, state, control)

    def on_save(self, args, state, control, **kwargs):
        """Hook: store the probe's sums (per rank) and the selection into the checkpoint."""
        folder = self.trainer.checkpoint_dir(state.global_step)
        if not os.path.isdir(folder):
            return
        if self.selected is None:
            self.probe.save(folder, rank())
        if state.is_world_process_zero:
            payload = {"selected": self.selected, "report": self.report.to_dict() if self.report else None}
            with open(os.path.join(folder, STATE_NAME), "w") as f:
                json.dump(payload, f, indent=2)

    def on_train_end(self, args, state, control, **kwargs):
        """Hook: stop the probe's gradient hooks, wait for the report's plot, warn if nothing was selected."""
        self.probe.stop()
        if self.selected is None and state.global_step > 0:
            # Stopped early (EarlyStoppingCallback counts no probing evaluation, but another callback
            # or a short IterableDataset can): the model holds every candidate trained, as the adapter will say.
            logger.warning(
                "Training stopped at step %d, before the switch at probe_steps=%d: nothing was selected and every "
                "candidate type (%s) trained. Train for more than probe_steps, or lower probe_steps.",
                state.global_step,
                self.probe_step_count,
                ", ".join(self.candidates),
            )
        if self._plotting is not None:
            self._plotting.join()

    # -- probing ------------------------------------------------------------------------------

    def _candidate_params(self) -> dict[str, torch.Tensor]:
        names = set(self.trainer.bias_layout.names(self.candidates))
        return {n: p for n, p in self.trainer.model.named_parameters() if n in names}

    def _candidate_values(self) -> dict[str, torch.Tensor]:
        settle_zero3(self.trainer.model_wrapped)
        return {n: read_full_fp32(p, keep_device=True) for n, p in self._candidate_params().items()}

    # -- the decision -------------------------------------------------------------------------

    def _select(self, args, state, post: dict[str, torch.Tensor]) -> None:
        """Decide from the probe's statistics and ``post``, the candidates' full fp32 values after probing."""
        trainer = self.trainer
        fisher_sums, counts = self.probe.reduced(args.device)
        attribution = self.probe.reduced_attribution(args.device)
        report = SelectionReport.build(
            layout=trainer.bias_layout,
            candidates=self.candidates,
            pretrained=trainer.pretrained_biases,
            trained=post,
            squared_grads=fisher_sums,
            grad_counts=counts,
            seed=args.seed,
            attribution=attribution,
        )
        inert = self._find_inert(args, fisher_sums)  # reported even when exclude_inert=False lets them compete
        chosen = self._choose(report, list(inert) if self.exclude_inert else [], trainer.total_parameters())
        self.selected = broadcast_from_main(chosen)
        if self.selected != chosen:
            logger.warning("Rank %d computed %s but follows rank 0's %s.", rank(), chosen, self.selected)
        before = trainer.count_parameters()
        trainer.freeze_groups([t for t in self.candidates if t not in self.selected], rewind=self.rewind)
        self._set_phase_learning_rate(args)
        self.probe.stop()
        report.record_decision(
            selected=self.selected,
            score=self.score,
            probe_steps=self.probe_step_count,
            step=state.global_step,
            inert=inert,
            rewind=self.rewind,
            budget=self.config.budget_parameters(trainer.total_parameters()),
            learning_rates={
                "probe": self.config.phase_learning_rate(args.learning_rate, len(self.candidates), probing=True),
                "after_switch": self.config.phase_learning_rate(args.learning_rate, len(self.selected), probing=False),
            },
            trainable_parameters={
                "before": before,
                "after": trainer.count_parameters(),
                "total": trainer.total_parameters(),
            },
        )
        self.report = report

    def _set_phase_learning_rate(self, args) -> None:
        # Absolute rates: applying them again on resume changes nothing. After a scaled probe a single
        # kept type must still be set, back to the full rate.
        probing = self.selected is None
        training = self.candidates if probing else self.selected
        rate = self.config.phase_learning_rate(args.learning_rate, len(training), probing)
        if rate != args.learning_rate or self.config.scale_probe_learning_rate:
            self.trainer.set_base_learning_rate(training, rate)

    def _choose(self, report: SelectionReport, excluded: list[str], total_parameters: int) -> list[str]:
        scores = report.type_scores(self.score)
        budget = self.config.budget_parameters(total_parameters)
        if budget is None:
            return rank_types(scores, excluded, self.config.max_types)
        sizes = {t: report.scores[t]["parameters"] for t in report.candidates}
        return select_within_budget(scores, sizes, excluded, budget, self.config.max_types)

    def _check_scoring(self) -> None:
        """Refuse an undefined score or a budget that decides nothing; settle a budget's default score."""
        pretrained, vectors = self.trainer.pretrained_biases, self.trainer.bias_layout.vectors
        require_rankable(self.score, {t: [pretrained[v.name] for v in vectors[t]] for t in self.candidates})
        budget = self.config.budget_parameters(self.trainer.total_parameters())
        if budget is None:
            return
        sizes = {t: self.trainer.count_parameters([t]) for t in self.candidates}
        self._budget_score = settle_budget(self.config.budget, budget, sizes, self.config.top_k)

    def _find_inert(self, args, squared_grads: dict[str, torch.Tensor]) -> dict[str, str]:
        # Collective (every rank calls it): the per-token sums are summed over processes first,
        # so every rank computes the same coherences and the same floor.
        tokens = self.probe.reduced_token_squares(args.device)
        vectors = self.trainer.bias_layout.vectors
        # A scaling vector multiplies a projection's input or output, which no softmax or norm
        # undoes as it undoes a constant shift: only bias types are tested.
        coherence = {
            t: gradient_coherence([squared_grads[v.name] for v in vectors[t]], [tokens[v.name] for v in vectors[t]])
            for t in self.candidates
            if t not in SCALING_TYPES
        }
        floor = self.inert_threshold or rounding_floor(gradient_dtypes(args, self.trainer.model))
        return find_inert(coherence, floor)

    def _publish(self, args, state, control) -> None:
        report = self.report
        should_log = control.should_log
        self.trainer.log(report.log_metrics())
        control.should_log = should_log  # Trainer.log clears it, which would drop this step's loss
        if state.is_world_process_zero:
            write_report(report, os.path.join(args.output_dir, REPORT_NAME))
            self._plotting = plot_in_background(report, os.path.join(args.output_dir, PLOT_NAME))
        logger.info(report.summary())

    # -- resume -------------------------------------------------------------------------------

    def _load_state(self, checkpoint: str | None) -> None:
        if checkpoint is None or not os.path.isfile(os.path.join(checkpoint, STATE_NAME)):
            return
        with open(os.path.join(checkpoint, STATE_NAME)) as f:
            payload = json.load(f)
        self.selected = payload["selected"]
        if payload.get("report"):
            self.report = SelectionReport.from_dict(payload["report"])
        if self.selected is None:
            params = self._candidate_params()
            self.probe.load(checkpoint, rank(), world_size(), {n: p.device for n, p in params.items()})
