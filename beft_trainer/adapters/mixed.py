"""Mixed batches: many adapters on one base model, each row of a batch with its own task.

    mixed = load_mixed_adapters(model, {"sst2": "out/sst2", "cola": "out/cola"})
    logits = model(**batch, adapter_names=["sst2", "cola", None, ...]).logits  # one name per row

Each module an adapter changes answers per row (``task_layers``): biases of linear layers
through one stacked table gathered per row (one matrix product for the batch, whatever the
number of tasks: ``rowwise``), anything else (the classifier, a LayerNorm bias) by running the
module once per task present in the batch.

Heads with other label counts give logits padded to the largest label count in the batch with
``-inf`` (``num_labels()`` says each row's count; softmax and argmax ignore the padding).
Each row's output is bit-identical to the model with only that row's adapter applied
(``load_adapter``) running the same batch: see docs/serving.md.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from ..errors import AdapterError
from .apply import AdapterSet, check_prepared, prepare_base_model
from .format import BeftAdapter, read_adapter, require_argument_types
from .task_layers import TaskLayers

__all__ = ["BASE_ADAPTER_NAME", "MixedAdapters", "load_mixed_adapters"]

#: peft's name for "no adapter" in ``adapter_names``; ``None`` means the same.
BASE_ADAPTER_NAME = "__base__"


class MixedAdapters:
    """Adapters loaded side by side on one base model, chosen per row with ``adapter_names=``.

    Installs itself on ``model``: ``model(**batch, adapter_names=[...])`` and
    ``model.generate(..., adapter_names=[...])`` take one adapter name per input row (``None``
    for the base model); without ``adapter_names`` the model is the base model. The shared
    weights are never changed. Inference only (``model.eval()``).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.adapters: dict[str, BeftAdapter] = {}
        self._active: list[torch.Tensor | None] = []
        self._marks: list[int] = []  # stack depth at each forward's entry, restored when it leaves
        self.layers = TaskLayers(model, lambda: self._active[-1] if self._active else None)
        self._hasher = AdapterSet(model)  # per-parameter digests: the base is hashed once
        self._handles = [
            model.register_forward_pre_hook(self._enter_forward, with_kwargs=True),
            model.register_forward_hook(self._leave_forward, always_call=True),
        ]
        self._class_generate = getattr(model, "generate", None)
        if self._class_generate is not None:
            object.__setattr__(model, "generate", self._generate)

    # -- adapters ---------------------------------------------------------------------------

    def add(self, adapter: BeftAdapter | str | os.PathLike, adapter_name: str) -> BeftAdapter:
        """Check ``adapter`` (or its folder) against the base model and load it as ``adapter_name``.

        Its head may have another label count than the model's. Raises ``AdapterError`` for a
        damaged adapter, another base model, or a name already taken.
        """
        if not isinstance(adapter, BeftAdapter):
            adapter = read_adapter(adapter)
        if adapter_name in self.adapters or adapter_name == BASE_ADAPTER_NAME:
            raise AdapterError(f"An adapter named {adapter_name!r} is already loaded; pick another name.")
        adapter_set = getattr(self.model, "beft_adapters", None)
        if isinstance(adapter_set, AdapterSet) and adapter_set.active_adapter is not None:
            raise AdapterError(
                f"Adapter {adapter_set.active_adapter!r} is applied to this model's weights; call "
                "set_adapter(None) on its AdapterSet before loading adapters for mixed batches."
            )
        prepare_base_model(self.model, adapter.metadata)
        fingerprint = self._hasher.base_fingerprint(exclude=adapter.head)
        check_prepared(self.model, adapter, fingerprint, any_num_labels=True)
        self.layers.add(adapter_name, adapter)
        self.adapters[adapter_name] = adapter
        return adapter

    def remove(self, adapter_name: str) -> None:
        """Forget an adapter."""
        self._require_loaded([adapter_name])
        del self.adapters[adapter_name]
        self.layers.remove(adapter_name)

    def unload(self) -> None:
        """Remove every hook and forward this set installed: the model is its plain self again."""
        self.layers.restore()
        for handle in self._handles:
            handle.remove()
        if self._class_generate is not None:
            object.__delattr__(self.model, "generate")
        if getattr(self.model, "beft_mixed_adapters", None) is self:
            object.__delattr__(self.model, "beft_mixed_adapters")

    def num_labels(self, adapter_names: Sequence[str | None]) -> list[int | None]:
        """The label count of each row's head (the base model's for ``None``): its logits' valid width."""
        base = getattr(getattr(self.model, "config", None), "num_labels", None)
        self._require_loaded(adapter_names)
        return [base if _is_base(n) else self.adapters[n].metadata.num_labels for n in adapter_names]

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held for the loaded adapters: the stacked bias ``tables`` and the per-task ``modules``."""
        return self.layers.memory_bytes()

    # -- rows -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def use(self, adapter_names: Sequence[str | None]) -> Iterator[None]:
        """Within the block, every forward of the model gives row ``i`` the adapter ``adapter_names[i]``."""
        self._active.append(self._rows(adapter_names))
        try:
            yield
        finally:
            self._active.pop()

    def _rows(self, adapter_names: Sequence[str | None]) -> torch.Tensor:
        if self.model.training:
            raise AdapterError("Mixed batches are for inference: call model.eval() first (dropout differs per row).")
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
            raise AdapterError("adapter_names takes a list with one adapter name (or None) per row of the batch.")
        self._require_loaded(adapter_names)
        self.layers.build()
        order = {name: i + 1 for i, name in enumerate(self.adapters)}
        rows = [0 if _is_base(n) else order[n] for n in adapter_names]
        device = next(self.model.parameters()).device
        return torch.tensor(rows, dtype=torch.long, device=device)

    def _enter_forward(self, module, args, kwargs):
        names = kwargs.pop("adapter_names", None)
        rows = self._active[-1] if self._active else None
        if names is not None:
            rows = self._rows(names)
            self._check_batch(rows, args, kwargs)
            self._check_labels(names, kwargs)
        # Pushed only once every check passed: torch calls _leave_forward even when this hook raises.
        self._marks.append(len(self._active))
        self._active.append(rows)
        return args, kwargs

    def _leave_forward(self, module, args, output):
        if self._marks:
            del self._active[self._marks.pop() :]

    def _generate(self, *args, adapter_names: Sequence[str | None] | None = None, **kwargs):
        if adapter_names is None:
            return self._class_generate(*args, **kwargs)
        with self.use(adapter_names):
            return self._class_generate(*args, **kwargs)

    # -- checks -----------------------------------------------------------------------------

    def _require_loaded(self, adapter_names: Sequence[str | None]) -> None:
        unknown = sorted({str(n) for n in adapter_names if not _is_base(n) and n not in self.adapters})
        if unknown:
            loaded = ", ".join(self.adapters) or "none"
            raise AdapterError(f"No adapters named {', '.join(unknown)}; loaded: {loaded} (None is the base model).")

    def _check_batch(self, rows: torch.Tensor, args, kwargs) -> None:
        inputs = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
        if isinstance(inputs, torch.Tensor) and inputs.shape[0] != rows.numel():
            raise AdapterError(
                f"adapter_names has {rows.numel()} names for a batch of {inputs.shape[0]} rows; give one per row."
            )

    def _check_labels(self, adapter_names: Sequence[str | None], kwargs) -> None:
        if kwargs.get("labels") is None:
            return
        base = getattr(self.model.config, "num_labels", None)
        if any(n != base for n in self.num_labels(adapter_names)):
            raise AdapterError(
                "labels with tasks of different label counts in one batch: the model's loss assumes "
                f"{base} labels; compute each task's loss from its rows of the logits."
            )


def _is_base(name: str | None) -> bool:
    return name is None or name == BASE_ADAPTER_NAME


def load_mixed_adapters(model: nn.Module, adapters: Mapping[str, BeftAdapter | str | os.PathLike]) -> MixedAdapters:
    """Load ``adapters`` (name -> adapter or folder) on ``model`` for mixed batches; returns the set.

    Calling it again on the same model adds to the same set. Then
    ``model(**batch, adapter_names=[...])`` and ``model.generate(..., adapter_names=[...])``.
    """
    require_argument_types(
        "load_mixed_adapters(model, adapters)",
        "the base model (a torch.nn.Module), then a mapping name -> BeftAdapter or its folder, "
        "e.g. {'sst2': 'out/sst2', 'cola': 'out/cola'}",
        (model, nn.Module),
        (adapters, Mapping),
    )
    mixed = getattr(model, "beft_mixed_adapters", None)
    if not isinstance(mixed, MixedAdapters):
        mixed = MixedAdapters(model)
        # A plain attribute (not a submodule): the set holds tensors, not parameters.
        object.__setattr__(model, "beft_mixed_adapters", mixed)
    for name, adapter in adapters.items():
        mixed.add(adapter, name)
    return mixed
