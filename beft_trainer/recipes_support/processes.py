"""Processes under a launcher (torchrun, accelerate, deepspeed): set up before the model loads, torn down after."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch.distributed as dist
from transformers import TrainingArguments

from ..distributed import start_deepspeed_comm

logger = logging.getLogger(__name__)
#: How long gloo's worker threads get to release finished collectives before the process group goes.
_GLOO_SETTLE_SECONDS = 0.2


def start_processes(args: TrainingArguments) -> None:
    """Set up the device and, under a launcher, the process group, before the model loads.

    Under ZeRO-3 ``from_pretrained`` partitions the weights as it loads them; DeepSpeed reads the
    world size from its process group then (``deepspeed.comm``) and would see 1 process if it did not exist.
    """
    logger.info("Process %d of %d on %s", args.process_index, args.world_size, args.device)
    if args.deepspeed and args.world_size > 1:
        start_deepspeed_comm()


def stop_processes() -> None:
    """After a run that ended normally: wait for every rank, let gloo settle, then destroy the process group.

    A gloo barrier keeps the collectives still in flight when it is issued (ZeRO-3's all-gathers) alive
    until the barrier itself is freed, and gloo frees a finished collective on its own worker thread.
    If that happens while the interpreter is shutting down, freeing their tensors asks for the GIL and
    the thread exits through C++ destructors: std::terminate, "terminate called without an active
    exception", a rank with exit status -6 after a successful run (a core dump showed exactly this
    stack; PyTorch issue 190489). So the barrier's handle is held until gloo's workers have let go of
    it and freed here, on the main thread, while Python is alive. Not for a failed run: a rank that
    raised cannot meet the others at the barrier. Also removes this rank's DeepSpeed shared-memory
    buffer (``remove_deepspeed_shm_buffer``).
    """
    if dist.is_available() and dist.is_initialized():
        barrier = dist.barrier(async_op=True)
        barrier.wait()
        remove_deepspeed_shm_buffer(dist.get_rank())
        time.sleep(_GLOO_SETTLE_SECONDS)  # the worker drops its reference right after completing
        del barrier
        dist.destroy_process_group()
        time.sleep(_GLOO_SETTLE_SECONDS)  # releases the GIL for any worker still freeing a collective


def deepspeed_shm_buffer(rank: int) -> Path:
    """The shared-memory file DeepSpeed's CPU communication creates for ``rank`` (when every rank is local)."""
    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_{rank}"


def remove_deepspeed_shm_buffer(rank: int) -> None:
    """Unlink this rank's DeepSpeed shared-memory buffer, once every rank is past using it.

    DeepSpeed's CPU backend maps a 66 MB buffer per rank into ``/dev/shm`` at start and never unlinks
    it: every multi-process run on CPU left 66 MB per rank in memory until reboot (292 files, 19 GB,
    filled this project's 23 GB machine). The mapping stays valid until the process exits.
    """
    if hasattr(os, "getuid"):  # POSIX only, as DeepSpeed's shm_open
        deepspeed_shm_buffer(rank).unlink(missing_ok=True)
