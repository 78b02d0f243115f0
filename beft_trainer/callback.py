"""BiasSelectionCallback: probe the candidate bias types, score them, select one, re-freeze.

Events used: ``on_init_end`` (refuses a plain Trainer), ``on_train_begin`` (validates, resumes,
starts gradient tracking), ``on_step_end`` (the switch at ``probe_steps``) and ``on_save``
(writes its state next to the checkpoint).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from .config import SelectionConfig
from .distributed import all_reduce_sum, broadcast_from_main, rank, read_full_fp32, settle_zero3
from .errors import BeftConfigError
from .plot import plot_report
from .report import PLOT_NAME, REPORT_NAME, SelectionReport, write_report
from .scores import find_inert, rank_types

logger = logging.getLogger(__name__)

STATE_NAME = "beft_state.json"


def _probe_file(process_rank: int) -> str:
    return f"beft_probe_rank{process_rank}.safetensors"


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
            raise BeftConfigError("Pass either a SelectionConfig or keyword options to BiasSelectionCallback, not both.")
        self.config = config if config is not None else SelectionConfig(**options)
        self.trainer = None
        self.selected: list[str] | None = None
        self.report: SelectionReport | None = None
        self._squared_grads: dict[str, torch.Tensor] = {}
        self._grad_counts: dict[str, int] = {}
        self._hooks: list = []

    def __getattr__(self, name: str) -> Any:
        # The options read as attributes (callback.probe_steps), from the one config.
        if name != "config" and name in SelectionConfig.option_names():
            return getattr(self.config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def bind(self, trainer) -> None:
        """Attach to a ``BeftTrainer`` (it calls this itself) and check the candidates exist."""
        trainer.bias_layout.require(self.candidates)
        self.trainer = trainer

    # -- events -------------------------------------------------------------------------------

    def on_init_end(self, args, state, control, **kwargs):
        if self.trainer is None:
            raise BeftConfigError(
                "BiasSelectionCallback needs BeftTrainer, which gives each bias type its own optimizer "
                "group so the switch can freeze exactly: use BeftTrainer(model, args, callbacks=[...])."
            )

    def on_train_begin(self, args, state, control, **kwargs):
        if self.probe_steps >= state.max_steps:
            raise BeftConfigError(
                f"probe_steps={self.probe_steps} leaves no training after the selection "
                f"(max_steps={state.max_steps}): lower probe_steps or train longer."
            )
        self._load_state(self.trainer.resume_checkpoint_dir)
        if self.selected is not None:
            self.trainer.freeze_groups([t for t in self.candidates if t not in self.selected])
        elif not self._hooks:
            self._track_gradients()

    def on_step_end(self, args, state, control, **kwargs):
        if self.selected is None and state.global_step >= self.probe_steps:
            self._select(args, state)
            self._publish(args, state, control)

    def on_save(self, args, state, control, **kwargs):
        folder = self.trainer.checkpoint_dir(state.global_step)
        if not os.path.isdir(folder):
            return
        if self.selected is None:
            tensors = {f"sq/{n}": t.cpu() for n, t in self._squared_grads.items()}
            tensors |= {f"count/{n}": torch.tensor(c) for n, c in self._grad_counts.items()}
            save_file(tensors, os.path.join(folder, _probe_file(rank())))
        if state.is_world_process_zero:
            payload = {"selected": self.selected, "report": self.report.to_dict() if self.report else None}
            with open(os.path.join(folder, STATE_NAME), "w") as f:
                json.dump(payload, f, indent=2)

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_hooks()

    # -- probing ------------------------------------------------------------------------------

    def _candidate_params(self) -> dict[str, torch.Tensor]:
        names = set(self.trainer.bias_layout.names(self.candidates))
        return {n: p for n, p in self.trainer.model.named_parameters() if n in names}

    def _track_gradients(self) -> None:
        for name, param in self._candidate_params().items():
            shape = self.trainer.pretrained_biases[name].shape
            if name not in self._squared_grads:
                self._squared_grads[name] = torch.zeros(shape, dtype=torch.float32, device=param.device)
                self._grad_counts[name] = 0
            self._hooks.append(param.register_hook(self._accumulator(name)))

    def _accumulator(self, name: str):
        def accumulate(grad: torch.Tensor) -> None:
            squared = self._squared_grads[name]
            if grad.numel() == squared.numel():
                squared.add_(grad.detach().float().view_as(squared).pow(2).to(squared.device))
                self._grad_counts[name] += 1

        return accumulate

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # -- the decision -------------------------------------------------------------------------

    def _select(self, args, state) -> None:
        trainer = self.trainer
        settle_zero3(trainer.model_wrapped)
        params = self._candidate_params()
        post = {n: read_full_fp32(p) for n, p in params.items()}
        fisher_sums, counts = self._reduced_gradients(args)
        report = SelectionReport.build(
            layout=trainer.bias_layout,
            candidates=self.candidates,
            pretrained=trainer.pretrained_biases,
            trained=post,
            squared_grads=fisher_sums,
            grad_counts=counts,
            seed=args.seed,
        )
        inert = find_inert(report.type_scores("fisher"), self.inert_threshold) if self.exclude_inert else {}
        chosen = rank_types(report.type_scores(self.score), list(inert), self.top_k)
        self.selected = broadcast_from_main(chosen)
        if self.selected != chosen:
            logger.warning("Rank %d computed %s but follows rank 0's %s.", rank(), chosen, self.selected)
        before = trainer.count_parameters()
        trainer.freeze_groups([t for t in self.candidates if t not in self.selected], rewind=self.rewind)
        self._remove_hooks()
        report.finish(
            selected=self.selected,
            score=self.score,
            probe_steps=self.probe_steps,
            step=state.global_step,
            inert=inert,
            rewind=self.rewind,
            trainable_parameters={
                "before": before,
                "after": trainer.count_parameters(),
                "total": trainer.total_parameters(),
            },
        )
        self.report = report

    def _reduced_gradients(self, args) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        names = list(self._squared_grads)
        counts = torch.tensor([float(self._grad_counts[n]) for n in names])
        reduced = all_reduce_sum([self._squared_grads[n] for n in names] + [counts], args.device)
        summed_counts = reduced[-1].tolist()
        return dict(zip(names, reduced[:-1], strict=True)), {
            n: int(c) for n, c in zip(names, summed_counts, strict=True)
        }

    def _publish(self, args, state, control) -> None:
        report = self.report
        should_log = control.should_log
        self.trainer.log(report.log_metrics())
        control.should_log = should_log  # Trainer.log clears it, which would drop this step's loss
        if state.is_world_process_zero:
            write_report(report, os.path.join(args.output_dir, REPORT_NAME))
            try:
                plot_report(report, os.path.join(args.output_dir, PLOT_NAME))
            except Exception as error:  # a plot must never cost the run
                logger.warning("Could not plot the selection report: %s", error)
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
        probe_file = os.path.join(checkpoint, _probe_file(rank()))
        if self.selected is None and os.path.isfile(probe_file):
            tensors = load_file(probe_file)
            params = self._candidate_params()
            self._squared_grads = {
                k[3:]: v.to(params[k[3:]].device) for k, v in tensors.items() if k.startswith("sq/")
            }
            self._grad_counts = {k[6:]: int(v) for k, v in tensors.items() if k.startswith("count/")}
