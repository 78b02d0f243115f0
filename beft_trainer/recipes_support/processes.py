"""Process set-up under a launcher (torchrun, accelerate, deepspeed), before the model loads."""

from __future__ import annotations

import logging

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
