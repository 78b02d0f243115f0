"""Everything that knows about DDP and DeepSpeed ZeRO: full parameters, ranks, optimizer groups.

Under DeepSpeed ZeRO the module's parameters are working copies (bf16, or empty partitions at
stage 3): the truth is the optimizer's fp32 master copy, which these helpers read and write.
The optimizer and the scheduler come wrapped (accelerate, DeepSpeed); the helpers that freeze a
parameter group reach the torch objects underneath. No other module reads ``ds_*`` attributes.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist


def _has_fp32_master(param: torch.Tensor) -> bool:
    # The attribute's presence, not its value, marks an optimized parameter: at stage 1/2 it is None
    # on ranks that hold no fragment of it, and they must still join the collective read.
    return hasattr(param, "_hp_mapping") or hasattr(param, "_z3_optimizer")


def gathered(params: list[torch.Tensor], modifier_rank: int | None = None):
    """Context in which ZeRO-3 partitioned ``params`` hold their full values (no-op otherwise)."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank)


def settle_zero3(engine: Any) -> None:
    """Finish and release ZeRO-3's prefetched parameters so they can be gathered outside a forward.

    An evaluation leaves some parameters in flight; gathering one then fails ("Cannot partition a
    param in flight"). ``engine`` is the Trainer's ``model_wrapped``; a no-op without ZeRO-3.
    """
    release = getattr(engine, "empty_partition_cache", None)
    if callable(release):
        release()


def read_full_fp32(param: torch.Tensor, keep_device: bool = False) -> torch.Tensor:
    """The full fp32 value of ``param``: the master copy under ZeRO, else the tensor.

    On CPU, or with ``keep_device`` on the device that holds it (no copy to the host: on a GPU each
    such copy waits for every queued kernel, which the probe would otherwise do per vector per step).
    """
    move = (lambda t: t) if keep_device else (lambda t: t.cpu())
    if _has_fp32_master(param):
        from deepspeed.utils import safe_get_full_fp32_param

        value = safe_get_full_fp32_param(param)
        if value is not None:
            return move(value.detach().float()).clone()
    with gathered([param]):
        return move(param.detach().float()).clone()


def write_full_fp32(param: torch.Tensor, value: torch.Tensor) -> None:
    """Set ``param`` to ``value`` in the module and, under ZeRO, in the fp32 master copy."""
    if _has_fp32_master(param):
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(param, value.to(param.device, torch.float32))
    with gathered([param], modifier_rank=0), torch.no_grad():
        if param.numel() == value.numel():
            param.copy_(value.to(param.device, param.dtype).view_as(param))


def is_distributed() -> bool:
    """Whether a torch.distributed process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce_sum(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Sum each tensor over ranks (returned on CPU); identity in a single process."""
    if not is_distributed() or not tensors:  # nothing to sum: every rank skips the collective alike
        return [t.cpu() for t in tensors]
    flat = torch.cat([t.flatten().double() for t in tensors]).to(device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat.cpu()
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset : offset + t.numel()].view_as(t).to(t.dtype))
        offset += t.numel()
    return out


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` must be picklable)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def is_zero_partitioned(param: torch.Tensor) -> bool:
    """Whether ``param`` is a ZeRO-3 partition (its module tensor is empty outside ``gathered``)."""
    return hasattr(param, "ds_id")


def full_numel(param: torch.Tensor) -> int:
    """Number of scalars of ``param``, a ZeRO-3 partition counted in full."""
    return int(getattr(param, "ds_numel", param.numel()))


def master_dtype(param: torch.Tensor) -> torch.dtype:
    """The dtype ``param`` trains in: fp32 under ZeRO (its master copy), else the tensor's own."""
    return torch.float32 if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping") else param.dtype


def innermost_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's and DeepSpeed's wrappers (they share its groups)."""
    while hasattr(optimizer, "optimizer") and optimizer.optimizer is not optimizer:
        optimizer = optimizer.optimizer
    return optimizer


def _innermost_scheduler(scheduler: Any, attribute: str = "base_lrs") -> Any:
    """The scheduler under accelerate's wrapper that holds ``attribute``, or None."""
    while scheduler is not None and not hasattr(scheduler, attribute) and hasattr(scheduler, "scheduler"):
        scheduler = scheduler.scheduler
    return scheduler if hasattr(scheduler, attribute) else None


def zero_group_learning_rates(optimizer: Any, scheduler: Any, indices: list[int]) -> None:
    """Set the learning rate of the optimizer groups ``indices`` to 0, in the scheduler too.

    The scheduler recomputes each group's rate from its base rate every step, so the base rate
    (and the last rate it reports) must be 0 as well, or the group would move again.
    """
    set_group_base_rates(optimizer, scheduler, indices, 0.0)


def set_group_base_rates(optimizer: Any, scheduler: Any, indices: list[int], base_rate: float) -> None:
    """Give the groups ``indices`` the base learning rate ``base_rate``, at the schedule's current point.

    Absolute, so applying it again (a resumed run) changes nothing: each group's current rate is
    ``base_rate`` times the schedule's current factor (its rate divided by its old base rate).
    """
    groups = innermost_optimizer(optimizer).param_groups
    inner = _innermost_scheduler(scheduler)
    # transformers' GreedyLR (lr_scheduler_type="greedy") has no base rates: its reset puts back the rates
    # it was built with, which would make a frozen group train again.
    initial = _innermost_scheduler(scheduler, "_init_lrs")
    for i in indices:
        old_base = inner.base_lrs[i] if inner is not None else groups[i].get("initial_lr", groups[i]["lr"])
        factor = groups[i]["lr"] / old_base if old_base else 1.0
        groups[i]["lr"] = base_rate * factor
        if "initial_lr" in groups[i]:
            groups[i]["initial_lr"] = base_rate
        if inner is not None:
            inner.base_lrs[i] = base_rate
            if getattr(inner, "_last_lr", None):
                inner._last_lr[i] = base_rate * factor
        if initial is not None:
            initial._init_lrs[i] = base_rate


def last_learning_rates(scheduler: Any) -> list[float] | None:
    """The scheduler's current rate of every optimizer group, or None before it has stepped."""
    scheduler = _innermost_scheduler(scheduler)
    rates = getattr(scheduler, "_last_lr", None)
    return list(rates) if rates else None


def _wrapper_with(optimizer: Any, *attributes: str) -> Any:
    """The first optimizer in the wrapper chain that has every one of ``attributes``, or None."""
    while optimizer is not None:
        if all(hasattr(optimizer, a) for a in attributes):
            return optimizer
        inner = getattr(optimizer, "optimizer", None)
        optimizer = inner if inner is not optimizer else None
    return None


def _zero3_optimizer(optimizer: Any) -> Any:
    """DeepSpeed's stage-3 optimizer in the wrapper chain, or None (ZeRO-1/2, DDP, one process)."""
    return _wrapper_with(optimizer, "fp32_partitioned_groups_flat", "sub_group_to_group_id")


def _zero_state(state: dict) -> None:
    for key, value in state.items():
        if torch.is_tensor(value) and key != "step":
            value.zero_()


def reset_optimizer_state(optimizer: Any, indices: list[int]) -> None:
    """Zero the optimizer state (momenta) of the parameters of groups ``indices``; steps are kept.

    ZeRO-1/2 keep each group's flat fp32 partition in ``param_groups[i]["params"]``, so the torch
    optimizer's state is found there. ZeRO-3 empties every group's ``params`` between steps and
    keys the state by its fp32 sub-group partitions instead (a sub-group never spans two groups):
    those are zeroed through its sub-group -> group mapping, swapped in and out when on NVMe.
    """
    inner = innermost_optimizer(optimizer)
    for i in indices:
        for param in inner.param_groups[i]["params"]:
            _zero_state(inner.state.get(param, {}))
    zero3 = _zero3_optimizer(optimizer)
    if zero3 is None:
        return
    wanted = set(indices)
    for sub_group, flat in enumerate(zero3.fp32_partitioned_groups_flat):
        if zero3.sub_group_to_group_id[sub_group] not in wanted:
            continue
        swapped = zero3._swappable_optimizer_subgroup(sub_group)
        if swapped:
            zero3._optimizer_states_and_gradient_swap_in(sub_group)
        _zero_state(inner.state.get(flat, {}))
        if swapped:
            zero3._optimizer_states_and_gradient_swap_out(sub_group)


def read_optimizer_state(optimizer: Any, param: torch.Tensor, key: str) -> torch.Tensor | None:
    """The full fp32 optimizer state ``key`` (e.g. Adam's ``exp_avg``) of ``param`` on CPU, or None.

    Under ZeRO it is assembled from every rank's partition: a collective, every rank must call it.
    """
    if _has_fp32_master(param):
        from deepspeed.utils import safe_get_full_optimizer_state

        zero12 = _wrapper_with(optimizer, "_hp_optimizer_states_linked", "_lazy_init_hp_params_optimizer_state")
        if zero12 is not None:
            # DeepSpeed 0.19's ZeRO-1/2 links each parameter to its state after the first group's first
            # step, before the other groups have any: their lookups fail until linked again.
            zero12._hp_optimizer_states_linked = False
            zero12._lazy_init_hp_params_optimizer_state()
        value = safe_get_full_optimizer_state(param, key)
    else:
        value = innermost_optimizer(optimizer).state.get(param, {}).get(key)
    return None if value is None else value.detach().float().cpu().clone().view(-1)


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def start_deepspeed_comm() -> None:
    """Give DeepSpeed the torch process group the Trainer started (no-op if it has one).

    On CPU the Trainer starts a plain ``torch.distributed`` group, but ZeRO-3's partitioned
    loading asks ``deepspeed.comm`` for the world size, which would say 1 without this.
    """
    import deepspeed.comm

    if not deepspeed.comm.is_initialized() and dist.is_initialized():
        deepspeed.comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
