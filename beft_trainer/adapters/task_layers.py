"""The modules that loaded adapters change, answering each row of a batch with its task's values.

Two kinds, chosen per module from what the loaded adapters change in it:

- **per-row layers**: an ``nn.Linear``/``Conv1D`` whose bias only (or GPT-2's split q/k/v bias
  parts) is changed. Its full biases are stacked in one table ``[1 + tasks, out]`` (row 0: the
  base model's) and each row of the batch gathers its own (``rowwise.row_forward``): one
  matrix product for the batch, whatever the number of tasks.
- **per-task modules**: any other leaf module (a classifier, a LayerNorm). It runs once per
  task present in the batch, over the whole batch, and each row keeps its task's output;
  outputs of other widths (label counts) are padded with ``-inf``.

The shared parameters are never written: module forwards are replaced on the instances
(restored by ``restore()``), and per-task values go through ``torch.func.functional_call``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from ..errors import AdapterError
from .arithmetic import apply_delta
from .format import BeftAdapter
from .rowwise import RowVectors, bias_parts, row_forward, rows_for_batch

__all__ = ["TaskLayers"]


class TaskLayers:
    """Per-task values of every module the loaded adapters change, and the forwards that use them.

    ``active_rows()`` gives the table row of each batch row (0: the base model, ``i``: the
    ``i``-th task added) or ``None`` for a plain forward.
    """

    def __init__(self, model: nn.Module, active_rows: Callable[[], torch.Tensor | None]) -> None:
        self.model = model
        self.active_rows = active_rows
        #: task name -> module name -> parameter (local name) -> full value for that task.
        self.values: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        self._base: dict[str, torch.Tensor] = {}
        self._tables: dict[str, torch.Tensor] | None = None
        self._originals: dict[str, object] = {}
        self._bypass = False

    def add(self, task: str, adapter: BeftAdapter) -> None:
        """Keep ``adapter``'s values (base + delta exactly as ``load_adapter`` computes them)."""
        params = dict(self.model.named_parameters())
        modules = dict(self.model.named_modules())
        values: dict[str, dict[str, torch.Tensor]] = {}
        for name in [*adapter.deltas, *adapter.head]:
            module, _, leaf = name.rpartition(".")
            if next(modules[module].children(), None) is not None:
                raise AdapterError(
                    f"{name} belongs to {module} ({type(modules[module]).__name__}), which has submodules: "
                    "mixed batches apply adapters in leaf modules only; use load_adapter or beft merge."
                )
            param = self._base.setdefault(name, params[name].detach().clone())
            if name in adapter.deltas:
                value = apply_delta(param, adapter.deltas[name], param.dtype, adapter.fixes.get(name))
            else:
                value = adapter.head[name].to(param.device, param.dtype)
            values.setdefault(module, {})[leaf] = value
        self.values[task] = values
        self._tables = None  # rebuilt before the next mixed forward

    def remove(self, task: str) -> None:
        """Forget a task's values."""
        del self.values[task]
        self._tables = None

    def build(self) -> dict[str, torch.Tensor]:
        """Tables and forwards for the tasks loaded now (cached until a task is added or removed)."""
        if self._tables is not None:
            return self._tables
        self.restore()
        modules = dict(self.model.named_modules())
        names = {module for values in self.values.values() for module in values}
        tables = {}
        for name in sorted(names):
            module, parts = modules[name], bias_parts(modules[name])
            per_task = [values.get(name, {}) for values in self.values.values()]
            if parts is not None and all(set(task) <= set(parts) for task in per_task):
                base = torch.cat([getattr(module, p).detach() for p in parts])
                rows = [torch.cat([task.get(p, getattr(module, p).detach()) for p in parts]) for task in per_task]
                tables[name] = torch.stack([base, *rows])
                self._install(name, module, self._per_row_forward)
            else:
                self._install(name, module, self._per_task_forward)
        self._tables = tables
        return tables

    def memory_bytes(self) -> dict[str, int]:
        """Bytes of the stacked bias ``tables`` and of the per-task ``modules``' values."""
        tables = self.build()
        modules = sum(
            v.numel() * v.element_size()
            for values in self.values.values()
            for module, params in values.items()
            if module not in tables
            for v in params.values()
        )
        return {"tables": sum(t.numel() * t.element_size() for t in tables.values()), "modules": modules}

    def restore(self) -> None:
        """Give every module its own forward back."""
        modules = dict(self.model.named_modules())
        for name, original in self._originals.items():
            if original is None:
                object.__delattr__(modules[name], "forward")
            else:
                object.__setattr__(modules[name], "forward", original)
        self._originals = {}

    def _install(self, name: str, module: nn.Module, forward) -> None:
        self._originals[name] = module.__dict__.get("forward")  # GPT-2's split c_attn has its own
        object.__setattr__(module, "forward", partial(forward, name, module, module.forward))

    def _per_row_forward(self, name: str, module: nn.Module, original, x: torch.Tensor, *args, **kwargs):
        rows = self.active_rows()
        if rows is None or self._bypass:
            return original(x, *args, **kwargs)
        bias = self._tables[name].index_select(0, rows_for_batch(rows, x.shape[0]))
        return row_forward(module, x, RowVectors(bias=bias))

    def _per_task_forward(self, name: str, module: nn.Module, original, x: torch.Tensor, *args, **kwargs):
        rows = self.active_rows()
        if rows is None or self._bypass:
            return original(x, *args, **kwargs)
        rows = rows_for_batch(rows, x.shape[0])
        tasks = [None, *self.values]
        outputs = {}
        for row in rows.unique().tolist():
            values = self.values[tasks[row]].get(name) if row else None
            if not values:
                outputs[row] = original(x, *args, **kwargs)
                continue
            self._bypass = True  # functional_call calls the module again: let it run its own forward
            try:
                outputs[row] = torch.func.functional_call(module, values, (x, *args), kwargs)
            finally:
                self._bypass = False
        return _rows_from_tasks(rows, outputs)


def _rows_from_tasks(rows: torch.Tensor, outputs: dict[int, torch.Tensor]) -> torch.Tensor:
    """Row ``i`` from ``outputs[rows[i]]``; widths that differ (label counts) are padded with ``-inf``."""
    first = next(iter(outputs.values()))
    if len(outputs) == 1:
        return first
    if not all(isinstance(y, torch.Tensor) and y.shape[:-1] == first.shape[:-1] for y in outputs.values()):
        raise AdapterError("Per-task modules must return tensors that differ at most in their last dimension.")
    width = max(y.shape[-1] for y in outputs.values())
    out = first.new_full((*first.shape[:-1], width), float("-inf"))
    for row, y in outputs.items():
        index = (rows == row).nonzero().squeeze(1)
        out[index, ..., : y.shape[-1]] = y.index_select(0, index)
    return out
