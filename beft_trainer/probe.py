"""Gradient statistics gathered while probing: squared gradients per bias vector, saved per rank.

The probe also credits each vector with the training loss its updates removed, to first order:
``-sum_steps g_t . (theta_t - theta_{t-1})`` with ``g_t`` the gradient the optimizer stepped on.
It is in units of loss whatever the vector's kind or size, and adds up over vectors.

Besides the squared gradient of each vector (the sum over its tokens), the probe keeps the sum
of its per-token squared gradients, read from the output gradient of the module that adds the
bias: their ratio tells a gradient that cancels to rounding noise (an inert type) from a real one.

Each process sums the squared gradients of its own batches; the selection sums them over
processes. A checkpoint holds one file per rank, so a resume on another number of processes
merges them: new rank ``r`` takes the files of old ranks ``r, r + N, r + 2N, ...`` (N = new world
size), and the sum over processes is the same as the checkpoint's.
"""

from __future__ import annotations

import glob
import logging
import os
import re

import torch
from safetensors.torch import load_file, save_file

from .distributed import all_reduce_sum, world_size

logger = logging.getLogger(__name__)

_SQUARED_PREFIX = "sq/"
_COUNT_PREFIX = "count/"
_TOKEN_PREFIX = "tok/"
_ATTRIBUTION_PREFIX = "attr/"
_FILE_PATTERN = re.compile(r"beft_probe_rank(\d+)\.safetensors$")


def probe_file_name(process_rank: int) -> str:
    """The file of one rank's statistics inside a checkpoint folder."""
    return f"beft_probe_rank{process_rank}.safetensors"


class ProbeStatistics:
    """Squared-gradient sums and backward counts of every candidate bias vector on this process."""

    def __init__(self) -> None:
        self.squared_grads: dict[str, torch.Tensor] = {}
        self.grad_counts: dict[str, int] = {}
        self.token_squared: dict[str, torch.Tensor] = {}
        self.attribution: dict[str, torch.Tensor] = {}
        self._step_grads: dict[str, torch.Tensor] = {}
        self._before: dict[str, torch.Tensor] = {}
        self._hooks: list = []

    @property
    def tracking(self) -> bool:
        """Whether gradient hooks are installed."""
        return bool(self._hooks)

    def track(self, params: dict[str, torch.Tensor], shapes: dict[str, torch.Size]) -> None:
        """Accumulate the squared gradient of each parameter (full ``shapes``: ZeRO-3 partitions are empty)."""
        for name, param in params.items():
            if name not in self.squared_grads:
                self.squared_grads[name] = torch.zeros(shapes[name], dtype=torch.float32, device=param.device)
                self.grad_counts[name] = 0
            self.attribution.setdefault(name, torch.zeros(1, dtype=torch.float64, device=param.device))
            self._hooks.append(param.register_hook(self._accumulator(name)))

    def start_step(self, values: dict[str, torch.Tensor]) -> None:
        """Remember the full fp32 values the next optimizer step starts from (``read_full_fp32``).

        Every per-step statistic stays on the parameters' device: no copy to the host while probing.
        """
        self._before = values
        self._step_grads = {}

    def end_step(self, values: dict[str, torch.Tensor]) -> None:
        """Credit each vector with ``-g . (after - before)`` of the step just taken, then start the next."""
        for name, after in values.items():
            grad = self._step_grads.get(name)
            if grad is not None and name in self._before:
                change = after.to(grad.device, torch.float64) - self._before[name].to(grad.device, torch.float64)
                credit = (grad.double().view_as(change) * change).sum().view(1)
                self.attribution[name] -= credit.to(self.attribution[name].device)
        self.start_step(values)

    def track_tokens(self, model: torch.nn.Module, names: list[str]) -> None:
        """Accumulate each vector's per-token squared gradient: the output gradient of its module, sliced.

        A module adds its bias vectors to consecutive slices of its output, in registration order
        (one ``bias``; GPT-2's split ``bias_q``/``bias_k``/``bias_v``), so that slice's gradient at
        each token is the vector's gradient at that token.
        """
        by_module: dict[str, list[str]] = {}
        for name in names:
            by_module.setdefault(name.rpartition(".")[0], []).append(name)
        for module_name, tracked in by_module.items():
            module = model.get_submodule(module_name)
            slices, offset, device = {}, 0, None
            for leaf, param in module.named_parameters(recurse=False):
                if leaf == "bias" or leaf.startswith("bias_"):
                    size = int(torch.Size(getattr(param, "ds_shape", param.shape)).numel())
                    slices[f"{module_name}.{leaf}"] = slice(offset, offset + size)
                    offset += size
                    device = param.device
            for name in tracked:
                self.token_squared.setdefault(name, torch.zeros(1, dtype=torch.float32, device=device))
            wanted = {name: slices[name] for name in tracked}
            self._hooks.append(module.register_forward_hook(self._token_hook(wanted)))

    def _token_hook(self, slices: dict[str, slice]):
        # Run eagerly under torch.compile (TrainingArguments(torch_compile=True)): traced, a forward hook that
        # registers a tensor hook lost the model's loss or never saw a gradient (all-zero sums: every type
        # "inert"). Only the probing steps pay the graph break; the hooks are removed at the switch.
        @torch.compiler.disable
        def on_output(module, inputs, output) -> None:
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(accumulate)

        def accumulate(grad: torch.Tensor) -> None:
            grad = _finite(grad.detach().float())
            for name, part in slices.items():
                total = self.token_squared[name]
                total += grad[..., part].pow(2).sum().to(total.device)

        return on_output

    def _accumulator(self, name: str):
        def accumulate(grad: torch.Tensor) -> None:
            squared = self.squared_grads[name]
            if grad.numel() == squared.numel():
                grad = _finite(grad.detach().float().view_as(squared))
                squared.add_(grad.pow(2).to(squared.device))
                self.grad_counts[name] += 1
                previous = self._step_grads.get(name)
                self._step_grads[name] = grad.clone() if previous is None else previous + grad

        return accumulate

    def stop(self) -> None:
        """Remove the gradient hooks."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def reduced(self, device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Sums over every process (collective): ``(squared-gradient sums, backward counts)``."""
        names = list(self.squared_grads)
        counts = torch.tensor([float(self.grad_counts[n]) for n in names])
        reduced = all_reduce_sum([self.squared_grads[n] for n in names] + [counts], device)
        summed_counts = {n: int(c) for n, c in zip(names, reduced[-1].tolist(), strict=True)}
        return dict(zip(names, reduced[:-1], strict=True)), summed_counts

    def reduced_token_squares(self, device: torch.device) -> dict[str, float]:
        """Per-token squared-gradient sums over every process (collective)."""
        names = list(self.token_squared)
        reduced = all_reduce_sum([self.token_squared[n] for n in names], device)
        return {n: float(t.sum()) for n, t in zip(names, reduced, strict=True)}

    def reduced_attribution(self, device: torch.device) -> dict[str, float]:
        """Loss removed per vector (collective): each process credits its local gradient, so the
        sum over processes divided by their number is the credit of the averaged gradient."""
        names = list(self.attribution)
        reduced = all_reduce_sum([self.attribution[n] for n in names], device)
        return {n: float(t.sum()) / world_size() for n, t in zip(names, reduced, strict=True)}

    def save(self, folder: str, process_rank: int) -> None:
        """Write this process's statistics into a checkpoint folder."""
        tensors = {_SQUARED_PREFIX + n: t.cpu() for n, t in self.squared_grads.items()}
        tensors |= {_COUNT_PREFIX + n: torch.tensor(c) for n, c in self.grad_counts.items()}
        tensors |= {_TOKEN_PREFIX + n: t.cpu() for n, t in self.token_squared.items()}
        tensors |= {_ATTRIBUTION_PREFIX + n: t.cpu() for n, t in self.attribution.items()}
        save_file(tensors, os.path.join(folder, probe_file_name(process_rank)))

    def load(self, folder: str, process_rank: int, world_size: int, devices: dict[str, torch.device]) -> None:
        """Read the statistics this process continues from (see the module docstring)."""
        saved = _saved_ranks(folder)
        mine = [r for r in saved if r % world_size == process_rank]
        if saved and len(saved) != world_size:
            logger.warning(
                "%s holds probe statistics of %d processes, this run has %d: merging them so the "
                "selection sees every process's gradients.",
                folder,
                len(saved),
                world_size,
            )
        self.squared_grads = {n: torch.zeros_like(t) for n, t in self.squared_grads.items()}
        self.grad_counts = dict.fromkeys(self.grad_counts, 0)
        self.token_squared = {n: torch.zeros(1) for n in self.token_squared}
        self.attribution = {n: torch.zeros(1, dtype=torch.float64) for n in self.attribution}
        for old_rank in mine:
            tensors = load_file(os.path.join(folder, probe_file_name(old_rank)))
            for key, value in tensors.items():
                if key.startswith(_SQUARED_PREFIX):
                    name = key.removeprefix(_SQUARED_PREFIX)
                    previous = self.squared_grads.get(name)
                    value = value.to(devices[name])
                    self.squared_grads[name] = value if previous is None else previous + value
                elif key.startswith(_TOKEN_PREFIX):
                    name = key.removeprefix(_TOKEN_PREFIX)
                    self.token_squared[name] = self.token_squared.get(name, torch.zeros(1)) + value
                elif key.startswith(_ATTRIBUTION_PREFIX):
                    name = key.removeprefix(_ATTRIBUTION_PREFIX)
                    self.attribution[name] = self.attribution.get(name, torch.zeros(1, dtype=torch.float64)) + value
                elif key.startswith(_COUNT_PREFIX):
                    name = key.removeprefix(_COUNT_PREFIX)
                    self.grad_counts[name] = self.grad_counts.get(name, 0) + int(value)
        self.token_squared = {n: t.to(devices.get(n, t.device)) for n, t in self.token_squared.items()}
        self.attribution = {n: t.to(devices.get(n, t.device)) for n, t in self.attribution.items()}


def _saved_ranks(folder: str) -> list[int]:
    files = glob.glob(os.path.join(glob.escape(folder), "beft_probe_rank*.safetensors"))
    return sorted(int(match.group(1)) for f in files if (match := _FILE_PATTERN.search(f)))


def _finite(grad: torch.Tensor) -> torch.Tensor:
    """``grad`` with non-finite entries as 0, without a host sync.

    Under fp16 a loss-scale overflow gives inf gradients to a step the optimizer then skips; one
    such step would make the Fisher sums inf and the attribution NaN (inf times no change) for good.
    """
    return torch.where(torch.isfinite(grad), grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
