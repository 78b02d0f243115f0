"""Gradient coherence of the q/k/v biases of real rotary decoders, fp32 and bf16 autocast (the inert test's evidence).

Qwen2.5-Coder-0.5B (its own q/k/v biases) and SmolLM2-135M (Llama, zero biases added): two batches
of four SST-2-like prompts, every layer's coherence ``|sum_t g_t| / sqrt(sum_t |g_t|^2)`` against the
floor ``sqrt(eps)``. Needs the converted models (``python -m beft_trainer.recipes_support.decoders``).

    nice python benchmarks/real_decoder_inert.py     # writes results/real_decoder_inert_coherence.md
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "recipes")]

import torch  # noqa: E402
import transformers as tf  # noqa: E402
from test_decoders import QWEN, SMOLLM2, real_coherence  # noqa: E402

from beft_trainer import add_missing_biases, find_biases, find_inert  # noqa: E402
from beft_trainer.scores import rounding_floor  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "real_decoder_inert_coherence.md"


def main() -> None:
    """Measure both models in both dtypes and write the markdown table."""
    lines = [
        "# Gradient coherence of q/k/v biases on real rotary decoders",
        "",
        "`nice python benchmarks/real_decoder_inert.py`; per type: min / max over layers. Inert needs max < floor.",
        "",
        "| model | dtype | floor sqrt(eps) | q min / max | k min / max | v min / max | inert |",
        "|---|---|---|---|---|---|---|",
    ]
    for folder in (QWEN, SMOLLM2):
        start = time.perf_counter()
        model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = tf.AutoTokenizer.from_pretrained(folder)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        if not find_biases(model).vectors.get("k"):
            add_missing_biases(model)
        for dtype in (torch.float32, torch.bfloat16):
            coherence = real_coherence(model, tokenizer, dtype)
            floor = rounding_floor({dtype})
            cells = " | ".join(f"{min(v):.3g} / {max(v):.3g}" for v in coherence.values())
            inert = ",".join(find_inert(coherence, floor)) or "none"
            lines.append(f"| {folder.parent.name} | {str(dtype)[6:]} | {floor:.1e} | {cells} | {inert} |")
            print(lines[-1], flush=True)
        lines.append(
            f"| ({folder.parent.name}: {time.perf_counter() - start:.0f} s on {torch.get_num_threads()} threads) |||||||"
        )
    OUT.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
