"""``beft plan MODEL --gpus N --gpu-memory GIB``: each option's estimate (``plan``), the choice, its launch line."""

from __future__ import annotations

import argparse
import os

from .errors import CommandError
from .plan import DS_CONFIGS, FIT_SHARE, GIB, GPU_OVERESTIMATE, Option, choose, estimate, read_shape

__all__ = ["add_plan_command"]


def add_plan_command(commands) -> None:
    """Add ``beft plan`` to the ``beft`` command's subparsers."""
    plan = commands.add_parser("plan", help="estimate GPU memory of bias-only training, pick how to launch it")
    plan.add_argument("model", help="a config.json, a model folder, an alias (minilm) or a cached Hub id")
    plan.add_argument("--gpus", type=int, required=True, help="GPUs available (one node or several)")
    plan.add_argument("--gpu-memory", type=float, required=True, help="memory of each GPU, GiB (e.g. 80)")
    plan.add_argument("--cpu-memory", type=float, help="CPU memory for offloaded weights, GiB (default: unchecked)")
    plan.add_argument("--seq-len", type=int, default=512, help="tokens per example (default 512)")
    plan.add_argument("--batch-size", type=int, default=8, help="examples per GPU and step (default 8)")
    plan.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    """Print every option's estimate, the chosen one and its launch line; 1 if none fits."""
    for flag in ("gpus", "gpu_memory", "seq_len", "batch_size", "cpu_memory"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise CommandError(f"--{flag.replace('_', '-')} must be positive, not {value}.")
    shape = read_shape(args.model)
    options = estimate(shape, args.gpus, args.batch_size, args.seq_len)
    chosen = choose(options, args.gpu_memory, args.cpu_memory)
    print(
        f"{args.model}: {shape.total_params:,} parameters, {shape.trained_params:,} in biases; "
        f"{args.gpus} x {args.gpu_memory:g} GiB GPUs, batch {args.batch_size} x {args.seq_len} tokens per GPU"
    )
    print(f"{'option':<58}{'GiB/GPU':>9}{'weights':>9}{'activ.':>8}{'logits':>8}{'slower':>8}")
    for option in sorted(options, key=lambda o: o.slowdown):
        mem = {k: v / GIB for k, v in option.gpu_bytes.items()}
        mark = " <- chosen" if option is chosen else ""
        print(
            f"{option.describe():<58}{option.peak / GIB:>9.1f}{mem['weights']:>9.1f}{mem['activations']:>8.1f}"
            f"{mem['logits']:>8.1f}{option.slowdown:>7.1f}x{mark}"
        )
    print(
        f"estimates lie 0-{GPU_OVERESTIMATE:.0%} above the peaks measured on an H100; "
        f"fit = at most {FIT_SHARE:.0%} of a GPU"
    )
    if chosen is None:
        print("nothing fits: add GPUs, lower --batch-size or --seq-len (or give more --cpu-memory)")
        return 1
    print(f"\nchosen: {chosen.describe()}, about {chosen.peak / GIB:.1f} GiB per GPU")
    if chosen.cpu_bytes:
        print(f"CPU memory for the offloaded weights: about {chosen.cpu_bytes / GIB:.1f} GiB")
    model = os.path.dirname(os.path.abspath(args.model)) if os.path.isfile(args.model) else args.model
    print(launch_line(chosen, model, args.batch_size, args.seq_len))
    if chosen.gpus > 8:
        print("more GPUs than one machine holds? the same line runs on several: docs/recipes.md, 'Several machines'")
    return 0


def launch_line(option: Option, model: str, batch_size: int, seq_len: int) -> str:
    """The launch line of recipes/run_opt.py for ``option`` (task and output folder to fill in)."""
    if option.backend == "plain":
        launch = "python recipes/run_opt.py"
    elif option.backend == "ddp":
        launch = f"accelerate launch --multi_gpu --num_processes {option.gpus} recipes/run_opt.py"
    else:
        launch = f"deepspeed --num_gpus {option.gpus} recipes/run_opt.py --deepspeed {DS_CONFIGS[option.backend]}"
    # Under DeepSpeed bf16 every working copy is bf16 and only trained vectors keep fp32 masters:
    # what frozen_dtype="auto" does without it.
    precision = "--bf16" if option.backend.startswith("zero3") else "--bf16 --frozen_dtype auto"
    parts = [
        launch,
        f"--model_name_or_path {model}",
        f"--per_device_train_batch_size {batch_size} --max_seq_length {seq_len}",
        precision + (" --gradient_checkpointing" if option.checkpointing else ""),
        "--task_name sst2 --method beft --output_dir outputs/plan",
    ]
    return " \\\n    ".join(parts)
