"""torch AdamW vs DeepSpeed's CPU Adam on the bias groups, where ds_configs/zero3_offload.json runs them (CPU).

    python benchmarks/cpu_adam.py            # prints a markdown table; about a minute on 2 cores

Two measurements, one torch thread:
1. whole bias-only training steps (forward, backward, optimizer) of a random OPT (hidden 512, 6 layers,
   batch 4 x 128, fp32) with one parameter group per bias type, steps/s with each optimizer;
2. the optimizer step alone on flat fp32 tensors the sizes of OPT-6.7B's per-type bias groups (ZeRO-3
   hands the optimizer one flat partition per group), the part CPU offload moves to the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

#: OPT-6.7B's projection bias types (32 layers of hidden 4096, ffn 16384): q, k, v, out, fc1, fc2.
OPT_6_7B_GROUPS = {"q": 131072, "k": 131072, "v": 131072, "attn_out": 131072, "mlp_in": 524288, "mlp_out": 131072}


def _optimizers(groups):
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    yield "torch AdamW (the Trainer's)", torch.optim.AdamW(groups(), lr=1e-3, weight_decay=0.0)
    yield "DeepSpeedCPUAdam", DeepSpeedCPUAdam(groups(), lr=1e-3, weight_decay=0.0, adamw_mode=True)


def training_steps(steps: int = 12, warmup: int = 3) -> dict[str, float]:
    """Median seconds of a whole bias-only step with each optimizer."""
    config = transformers.OPTConfig(
        hidden_size=512, num_hidden_layers=6, num_attention_heads=8, ffn_dim=2048, word_embed_proj_dim=512
    )
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(config)
    by_type: dict[str, list] = {}
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith(".bias"))
        if param.requires_grad:
            by_type.setdefault(name.split(".")[-2], []).append(param)
    ids = torch.randint(0, config.vocab_size, (4, 128))
    out = {}
    for label, optimizer in _optimizers(lambda: [{"params": p} for p in by_type.values()]):
        times = []
        for _ in range(warmup + steps):
            start = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            times.append(time.perf_counter() - start)
        out[label] = statistics.median(times[warmup:])
    return out


def optimizer_steps(repeats: int = 200) -> dict[str, float]:
    """Median seconds of one optimizer step over OPT-6.7B-sized flat per-type bias partitions."""
    flats = {t: torch.randn(n) for t, n in OPT_6_7B_GROUPS.items()}
    out = {}
    for label, optimizer in _optimizers(lambda: [{"params": [torch.nn.Parameter(f.clone())]} for f in flats.values()]):
        for group in optimizer.param_groups:
            group["params"][0].grad = torch.randn_like(group["params"][0])
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            optimizer.step()
            times.append(time.perf_counter() - start)
        out[label] = statistics.median(times[10:])
    return out


def main() -> None:
    # No options; a parser still answers --help and refuses a stray argument instead of running for a minute.
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    torch.set_num_threads(1)
    whole = training_steps()
    alone = optimizer_steps()
    print(f"torch {torch.__version__}, 1 thread")
    print(
        "| optimizer | OPT h512 L6 bias-only step | steps/s | optimizer step, OPT-6.7B bias groups (1.18M scalars) |"
    )
    print("|---|---|---|---|")
    for label in whole:
        print(f"| {label} | {whole[label] * 1e3:.1f} ms | {1 / whole[label]:.2f} | {alone[label] * 1e3:.2f} ms |")


if __name__ == "__main__":
    main()
