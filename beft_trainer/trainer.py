"""BeftTrainer: a ``transformers.Trainer`` that trains bias vectors and freezes them exactly.

Overridden hooks: ``__init__`` (prepares the model and the trainable set), ``create_optimizer``
(one parameter group per bias type), ``train`` (checks the checkpoint it resumes from),
``save_model`` (adds the adapter and the run's settings), ``_get_learning_rate`` (logs a group
that still trains), ``_determine_best_metric`` (an evaluation while probing is never the best) and
``_clip_grad_norm`` (frozen groups' gradients stay out of the clipped norm).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from .adapters import AdapterMetadata, BeftAdapter, base_model_fingerprint, build_adapter
from .adapters.build import groups_to_store
from .biases import SCALING_TYPES, has_added_biases
from .callback import BiasSelectionCallback
from .checks import check_model, check_no_optimizer_given, check_optimizer, check_output_dir, find_selection_callback
from .config import BeftConfig
from .distributed import (
    full_numel,
    last_learning_rates,
    read_full_fp32,
    reset_optimizer_state,
    set_group_base_rates,
    settle_zero3,
    write_full_fp32,
    zero_group_learning_rates,
)
from .errors import BeftConfigError
from .groups import (
    HEAD_GROUPS,
    bias_parameter_names,
    build_optimizer,
    freeze_all_but,
    head_parameter_names,
    trainable_groups,
)
from .heads import find_head_parameters
from .precision import cast_frozen_parameters, resolve_frozen_dtype
from .resume import check_resume, resolve_checkpoint, run_settings, write_run_settings
from .vectors import prepare_model


class BeftTrainer(Trainer):
    """A Trainer that trains only bias vectors (BitFit/BEFT) and the task head.

    Use it like ``transformers.Trainer``. Without a ``BiasSelectionCallback`` it trains the fixed
    ``beft_config.bias_types`` (default: the value biases). With the callback, the candidate
    types train while probing; at the switch the others are frozen exactly: each bias type is
    its own optimizer parameter group, and a frozen group's learning rate (and the scheduler's
    base rate) is set to 0 and its optimizer state reset, which holds under DDP and DeepSpeed
    ZeRO where flipping ``requires_grad`` does not.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: Any = None,
        *trainer_args: Any,
        beft_config: BeftConfig | None = None,
        callbacks: list | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        check_model(model)
        check_no_optimizer_given(trainer_kwargs.get("optimizers", (None, None)))
        self.beft_config = beft_config or BeftConfig()
        if not isinstance(self.beft_config, BeftConfig):
            raise BeftConfigError(f"beft_config must be a BeftConfig, not {type(self.beft_config).__name__}.")
        selection = find_selection_callback(callbacks, self.beft_config)
        self.selection_callback = selection
        self.trained_types = self._requested_types(selection)
        self.bias_layout = prepare_model(model, self.beft_config.add_missing_biases, self.trained_types or ())
        self.parameter_groups = self._trainable_groups(model)
        self.frozen_groups: list[str] = []
        trainable = [n for names in self.parameter_groups.values() for n in names]
        freeze_all_but(model, trainable)
        # Before the cast below: adapters load onto the original (float32) checkpoint.
        self.base_fingerprint = base_model_fingerprint(model, exclude=head_parameter_names(self.parameter_groups))
        frozen_dtype = resolve_frozen_dtype(self.beft_config.frozen_dtype, args)
        if frozen_dtype is not None:
            cast_frozen_parameters(model, frozen_dtype, trainable)
        bias_names = bias_parameter_names(self.parameter_groups)
        self.pretrained_biases = {
            name: read_full_fp32(param) for name, param in model.named_parameters() if name in bias_names
        }
        self.resume_checkpoint_dir: str | None = None
        if selection is not None:
            selection.bind(self)
        try:
            super().__init__(model, args, *trainer_args, callbacks=callbacks, **trainer_kwargs)
            check_optimizer(self.args, self.accelerator.state.deepspeed_plugin if self.is_deepspeed_enabled else None)
        except BaseException:
            if selection is not None:  # a refused trainer holds no selection: the callback can serve the next one
                selection.trainer = None
            raise

    # -- set-up -------------------------------------------------------------------------------

    def _requested_types(self, selection: BiasSelectionCallback | None) -> tuple[str, ...] | None:
        """The vector types that train (the candidates while probing); None for BitFit (every bias)."""
        if selection is not None:
            return tuple(selection.config.candidates)
        if self.beft_config.is_bitfit:
            return None
        return tuple(self.beft_config.bias_types or ("v",))

    def _trainable_groups(self, model: nn.Module) -> dict[str, list[str]]:
        layout, config = self.bias_layout, self.beft_config
        vector_types = self.trained_types if self.trained_types is not None else layout.bias_types
        layout.require(vector_types)
        return trainable_groups(
            {t: layout.names([t]) for t in vector_types},
            head=find_head_parameters(model, config.head_modules),
            decay=set(self.get_decay_parameter_names(model)),
            other_biases=layout.other_biases if config.is_bitfit else None,
            train_head=config.train_head,
            backbone_vectors=layout.names(layout.types),
        )

    # -- Trainer hooks ------------------------------------------------------------------------

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Override: one optimizer parameter group per bias type (plus the head's two).

        The optimizer is ``optimizer_cls_and_kwargs`` when given, else ``args.optim``'s, as in the
        Trainer. Optimizers that ignore a group's learning rate (LOMO, schedule-free) are refused at init.
        """
        if self.optimizer is not None:
            return self.optimizer
        model = model or self.model
        self.group_index = {name: i for i, name in enumerate(self.parameter_groups)}
        optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs or self.get_optimizer_cls_and_kwargs(
            self.args, model
        )
        self.optimizer = build_optimizer(
            self.parameter_groups,
            dict(model.named_parameters()),
            self.args.weight_decay,
            optimizer_cls,
            optimizer_kwargs,
        )
        return self.optimizer

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Override: also write the BEFT adapter (bias deltas + head, a few KB) next to the model.

        Every process calls it (reading ZeRO-3 partitions is collective); only the main one writes.
        """
        super().save_model(output_dir, _internal_call)
        self.save_adapter(output_dir)
        if self.is_world_process_zero():
            write_run_settings(output_dir or self.args.output_dir, self.run_settings())

    # -- the adapter --------------------------------------------------------------------------

    def build_adapter(self) -> BeftAdapter:
        """The BEFT adapter of the model as it is now: trained bias deltas and the head.

        Stores the active bias groups, and any frozen group that moved (``rewind=False`` leaves
        its probing changes in the model, which the adapter must reproduce). Collective under
        ZeRO-3 (every process must call it).
        """
        settle_zero3(self.model_wrapped)
        head = head_parameter_names(self.parameter_groups)
        bias_groups = {g: names for g, names in self.parameter_groups.items() if g not in HEAD_GROUPS}
        stored = groups_to_store(self.model, bias_groups, self.active_groups, self.pretrained_biases)
        selection = self.selection_callback
        return build_adapter(
            self.model,
            stored,
            self.pretrained_biases,
            head,
            selected=[g for g in self.active_groups if g not in HEAD_GROUPS],
            score=selection.score if selection is not None else None,
            added_biases=has_added_biases(self.model),
            scaling_types=[t for t in self.bias_layout.types if t in SCALING_TYPES],
            base_fingerprint=self.base_fingerprint,
        )

    def save_adapter(self, output_dir: str | None = None) -> AdapterMetadata:
        """Write the adapter to ``output_dir`` (default ``args.output_dir``) on the main process.

        Every process calls it (reading ZeRO-3 partitions is collective). Returns the metadata
        (``file_size`` is set on the main process).
        """
        adapter = self.build_adapter()
        if self.is_world_process_zero():
            adapter.save(output_dir or self.args.output_dir)
        return adapter.metadata

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        """Override: check the checkpoint against this run's settings, and remember it for the callback."""
        checkpoint = resolve_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if checkpoint is not None:
            check_resume(checkpoint, self.run_settings())
        else:
            check_output_dir(self.args.output_dir)
        self.resume_checkpoint_dir = checkpoint
        return super().train(resume_from_checkpoint=checkpoint, **kwargs)

    def run_settings(self) -> dict[str, Any]:
        """What shaped this run (parameter groups, BeftConfig, selection options), stored with each checkpoint."""
        selection = self.selection_callback.config if self.selection_callback is not None else None
        head = head_parameter_names(self.parameter_groups)
        return run_settings(list(self.parameter_groups), self.beft_config, selection, head, self.base_fingerprint)

    def _get_learning_rate(self) -> float:
        """Override: the rate of the first group that still trains (the first group may be frozen)."""
        rates = last_learning_rates(self.lr_scheduler)
        active = [i for i, name in enumerate(self.parameter_groups) if name not in self.frozen_groups]
        if rates is None or not active or len(rates) != len(self.parameter_groups):
            return super()._get_learning_rate()
        return rates[active[0]]

    def _determine_best_metric(self, metrics: dict[str, float], trial: Any) -> bool:
        """Override: an evaluation while probing (every candidate trained) never counts as the best.

        As the best metric it would hide the best checkpoint after the switch and let
        ``EarlyStoppingCallback`` stop the probe."""
        if self.selection_callback is None or self.selection_callback.selected is not None:
            return super()._determine_best_metric(metrics, trial)
        best = self.state.best_metric, self.state.best_global_step
        super()._determine_best_metric(metrics, trial)  # its checks still run (a metric the evaluation lacks)
        self.state.best_metric, self.state.best_global_step = best
        return False

    def _clip_grad_norm(self, model: nn.Module):
        """Override: clip by the norm of the groups that still train (DDP keeps frozen groups' gradients).

        DeepSpeed clips inside its engine (docs/errors.md)."""
        if self.frozen_groups and not self.is_deepspeed_enabled:
            params = dict(self.model.named_parameters())
            for name in (n for g in self.frozen_groups for n in self.parameter_groups[g]):
                params[name].grad = None
        return super()._clip_grad_norm(model)

    # -- the switch ---------------------------------------------------------------------------

    def freeze_groups(self, group_names: Sequence[str], rewind: bool = False) -> None:
        """Freeze the given bias-type groups exactly for the rest of training.

        Their learning rate and the scheduler's base rate become 0 and their optimizer state is
        zeroed; with ``rewind`` their parameters return to the pretrained values (in the fp32
        master copy too, under ZeRO). Idempotent, so a resumed run can apply it again.
        """
        unknown = [g for g in group_names if g not in self.parameter_groups]
        if unknown:
            raise BeftConfigError(f"Cannot freeze {unknown}: trainable groups are {list(self.parameter_groups)}.")
        if self.optimizer is None:
            raise BeftConfigError("freeze_groups() needs the optimizer: call it during training.")
        indices = [self.group_index[g] for g in group_names]
        zero_group_learning_rates(self.optimizer, self.lr_scheduler, indices)
        reset_optimizer_state(self.optimizer, indices)
        if rewind:
            self._rewind([n for g in group_names for n in self.parameter_groups[g]])
        if not self.is_deepspeed_enabled and self.args.world_size == 1:
            # Only safe without DDP/ZeRO, whose gradient bookkeeping expects every grad.
            params = dict(self.model.named_parameters())
            for name in (n for g in group_names for n in self.parameter_groups[g]):
                params[name].requires_grad_(False)
        self.frozen_groups = sorted(set(self.frozen_groups) | set(group_names), key=list(self.group_index).index)

    def set_base_learning_rate(self, group_names: Sequence[str], base_rate: float) -> None:
        """Train the given groups at ``base_rate`` (before the schedule's factor) from now on; idempotent."""
        indices = [self.group_index[g] for g in group_names]
        set_group_base_rates(self.optimizer, self.lr_scheduler, indices, base_rate)

    def _rewind(self, names: list[str]) -> None:
        params = dict(self.model.named_parameters())
        for name in names:
            write_full_fp32(params[name], self.pretrained_biases[name])

    # -- what trains --------------------------------------------------------------------------

    @property
    def active_groups(self) -> list[str]:
        """Parameter groups that still train."""
        return [g for g in self.parameter_groups if g not in self.frozen_groups]

    def count_parameters(self, group_names: Sequence[str] | None = None) -> int:
        """Number of scalars in the given groups (default: every group still training)."""
        params = dict(self.model.named_parameters())
        names = [n for g in (group_names or self.active_groups) for n in self.parameter_groups[g]]
        return sum(full_numel(params[n]) for n in names)

    def total_parameters(self) -> int:
        """Number of scalars in the whole model (ZeRO-3 partitions counted in full)."""
        return sum(full_numel(p) for p in self.model.parameters())

    def checkpoint_dir(self, step: int) -> str:
        """The folder the Trainer writes the checkpoint of ``step`` to."""
        return os.path.join(self.args.output_dir, f"checkpoint-{step}")
