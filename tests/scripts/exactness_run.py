"""Train a tiny BERT with BEFT selection on one backend and record parameters for the tests.

Run by tests/test_backends.py as a single process, under torchrun (DDP, gloo) or under the
deepspeed launcher (ZeRO-2/3 on CPU). Each rank writes ``rank<r>.safetensors`` (every parameter's
full fp32 value at init, right after the switch, and at the end) and ``rank<r>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import TrainerCallback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from helpers import TokenDataset, tiny_bert, training_args  # noqa: E402

from beft_trainer import BeftConfig, BeftTrainer, BiasSelectionCallback  # noqa: E402
from beft_trainer.distributed import rank, read_full_fp32, read_optimizer_state  # noqa: E402
from beft_trainer.recipes_support import stop_processes  # noqa: E402
from beft_trainer.vectors import prepare_model  # noqa: E402

#: Adam's moments, recorded for every bias right after the switch.
ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")


def zero_config(stage: int, offload: bool = False) -> dict:
    """A ZeRO config for CPU: every value the Trainer sets is "auto" (``offload``: as ds_configs/zero3_offload.json)."""
    zero: dict = {"stage": stage}
    if offload:
        zero |= {"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}
    return {
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
    }


class SnapshotAfterSwitch(TrainerCallback):
    """Reads every parameter's full value, and every bias's Adam state, once the selection has
    happened (it runs after it, before the next optimizer step refills the frozen moments)."""

    def __init__(self, probe_steps: int, bias_names: list[str]):
        self.probe_steps = probe_steps
        self.bias_names = bias_names
        self.values: dict[str, torch.Tensor] = {}
        self.adam_state: dict[str, torch.Tensor] = {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step != self.probe_steps:
            return
        params = dict(model.named_parameters())
        self.values = {n: read_full_fp32(p) for n, p in params.items()}
        for name in self.bias_names:  # the same order on every rank: a collective under ZeRO
            for key in ADAM_STATE_KEYS:
                value = read_optimizer_state(optimizer, params[name], key)
                if value is not None:
                    self.adam_state[f"{key}/{name}"] = value


def bf16_representable(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every parameter rounded to bf16 and kept fp32, so a cast to bf16 loses nothing."""
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(torch.bfloat16).float())
    return model


def naive_freeze(trainer: BeftTrainer, group_names, rewind: bool = False) -> None:
    """The freeze that is NOT enough: flip requires_grad, leave the optimizer alone (negative control)."""
    params = dict(trainer.model.named_parameters())
    for name in (n for g in group_names for n in trainer.parameter_groups[g]):
        params[name].requires_grad_(False)
    trainer.frozen_groups = list(group_names)


def run(
    out: str,
    zero_stage: int = 0,
    probe_steps: int = 4,
    max_steps: int = 10,
    grad_accum: int = 1,
    naive: bool = False,
    offload: bool = False,
    candidates: tuple[str, ...] = ("q", "k", "v"),
    cuda: bool = False,
) -> None:
    """Train, then write this rank's record and tensors to ``out``.

    ``cuda``: on the GPU under bf16 autocast, from weights that bf16 represents exactly (DeepSpeed's bf16
    engine and ``frozen_dtype="auto"`` store them in bf16, so the pretrained values stay comparable), with
    bf16 frozen weights when DeepSpeed is not in charge of them.
    """
    if naive:
        BeftTrainer.freeze_groups = naive_freeze
    model = bf16_representable(tiny_bert()) if cuda else tiny_bert()
    prepare_model(model, scaling_types=candidates)  # scaling vectors exist (as ones) in the initial snapshot
    init = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    extra = {"deepspeed": zero_config(zero_stage, offload)} if zero_stage else {}
    if cuda:
        extra |= {"use_cpu": False, "bf16": True}
    args = training_args(
        out, max_steps=max_steps, per_device_train_batch_size=4, gradient_accumulation_steps=grad_accum, **extra
    )
    config = BeftConfig(frozen_dtype="auto") if cuda and not zero_stage else None
    selection = BiasSelectionCallback(probe_steps=probe_steps, candidates=candidates)
    snap = SnapshotAfterSwitch(probe_steps, [])
    trainer = BeftTrainer(
        model, args, train_dataset=TokenDataset(size=64), beft_config=config, callbacks=[selection, snap]
    )
    snap.bias_names = trainer.bias_layout.names(selection.candidates)
    trainer.train()
    final = {n: read_full_fp32(p) for n, p in trainer.model.named_parameters()}
    trainer.save_model(os.path.join(out, "model"))  # collective under ZeRO-3: every rank calls it

    r = rank()
    tensors = {f"init/{n}": t for n, t in init.items()}
    tensors |= {f"switch/{n}": t for n, t in snap.values.items()}
    tensors |= {f"final/{n}": t for n, t in final.items()}
    tensors |= {f"state/{k}": t for k, t in snap.adam_state.items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, f"rank{r}.safetensors"))
    record = {
        "selected": selection.selected,
        "report": selection.report.to_dict(),
        "bias_names": {t: trainer.bias_layout.names([t]) for t in trainer.bias_layout.types},
        "head": trainer.parameter_groups.get("head", []) + trainer.parameter_groups.get("head_decay", []),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "global_step": trainer.state.global_step,
        "bf16_representable": cuda,
        "frozen_dtypes": sorted({str(p.dtype) for p in trainer.model.parameters() if not p.requires_grad}),
        "device": str(next(trainer.model.parameters()).device.type),
    }
    with open(os.path.join(out, f"rank{r}.json"), "w") as f:
        json.dump(record, f)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--zero_stage", type=int, default=0)
    parser.add_argument("--probe_steps", type=int, default=4)
    parser.add_argument("--max_steps", type=int, default=10)
    parser.add_argument("--grad_accum", type=int, default=1)
    parser.add_argument("--naive_freeze", action="store_true", help="negative control: flip requires_grad only")
    parser.add_argument("--offload", action="store_true", help="parameters and optimizer state in CPU memory")
    parser.add_argument("--candidates", default="q,k,v", help="comma list of candidate vector types")
    parser.add_argument("--cuda", action="store_true", help="on the GPU, bf16 autocast (see run())")
    parser.add_argument("--local_rank", type=int, default=-1)
    cli = parser.parse_args()
    candidates = tuple(cli.candidates.split(","))
    run(
        cli.out,
        cli.zero_stage,
        cli.probe_steps,
        cli.max_steps,
        cli.grad_accum,
        cli.naive_freeze,
        cli.offload,
        candidates,
        cli.cuda,
    )
    stop_processes()  # as the recipes end: no gloo thread may free a collective during interpreter shutdown


if __name__ == "__main__":
    main()
