"""Processes under a launcher (torchrun, accelerate, deepspeed): set up before the model loads, torn down after."""

from __future__ import annotations

import logging

import torch.distributed as dist
from transformers import TrainingArguments

from ..distributed import start_deepspeed_comm

logger = logging.getLogger(__name__)


def start_processes(args: TrainingArguments) -> None:
    """Set up the device and, under a launcher, the process group, before the model loads.

    Under ZeRO-3 ``from_pretrained`` partitions the weights as it loads them; DeepSpeed reads the
    world size from its process group then (``deepspeed.comm``) and would see 1 process if it did not exist.
    """
    logger.info("Process %d of %d on %s", args.process_index, args.world_size, args.device)
    if args.deepspeed and args.world_size > 1:
        start_deepspeed_comm()


def stop_processes() -> None:
    """After a run that ended normally: wait for every rank, then destroy the process group.

    Left to interpreter teardown, the group's threads can outlive it and abort a rank ("terminate
    called without an active exception", exit status -6) after the run succeeded. Not for a failed
    run: a rank that raised cannot meet the others at the barrier.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
