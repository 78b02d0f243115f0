"""Process set-up under a launcher (torchrun, accelerate, deepspeed), before the model loads."""

from __future__ import annotations

import logging

from transformers import TrainingArguments

logger = logging.getLogger(__name__)


def start_processes(args: TrainingArguments) -> None:
    """Set up the device and, under a launcher, the process group, before the model loads.

    Under ZeRO-3 ``from_pretrained`` partitions the weights as it loads them; DeepSpeed reads the
    world size from its process group then (``deepspeed.comm``) and would see 1 process if it did not exist.
    """
    logger.info("Process %d of %d on %s", args.process_index, args.world_size, args.device)
    if args.deepspeed and args.world_size > 1:
        import deepspeed.comm
        import torch.distributed

        if not deepspeed.comm.is_initialized() and torch.distributed.is_initialized():
            # On CPU the Trainer starts a plain torch.distributed group; ZeRO-3's loading asks deepspeed.comm.
            deepspeed.comm.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)
