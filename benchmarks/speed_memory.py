"""Step time and memory of bias-only training against full fine-tuning and LoRA, through the Trainer.

Random-initialised OPT sequence classifiers (no OPT weights are needed to time a step). Every
(size, method) runs in its own subprocess so that peak memory is its own; the whole grid is
repeated ``--repeats`` times, interleaved, and each ratio to full fine-tuning is taken within one
repeat, then the median over repeats is reported.

Methods (all through ``transformers.Trainer`` / ``BeftTrainer``; a TrainerCallback times steps):
  full       full fine-tuning (fp32 master weights), AdamW
  lora       LoRA r=8 on q_proj, v_proj (peft); base weights in bf16 when --bf16
  bitfit     every bias + head (BeftConfig(bias_types="all"))
  probe      BEFT probing phase: q, k, v biases + head (BiasSelectionCallback, before its switch)
  v          BEFT selected phase: value biases + head, fp32 weights
  v_amp      value biases + head, bf16 autocast, fp32 frozen weights     (isolates the next row)
  v_bf16     value biases + head, bf16 autocast, bf16 frozen weights (BeftConfig(frozen_dtype="auto"))
  forward    forward pass only (Trainer.evaluate, prediction_loss_only): the floor
  bare_full  full fine-tuning in a bare PyTorch loop (Trainer overhead = full / bare_full)
  bare_v     value biases + head in a bare PyTorch loop (overhead = v / bare_v)

    python benchmarks/speed_memory.py                                   # CPU, tiny OPT configs
    python benchmarks/speed_memory.py --device cuda --sizes 125m 1.3b 6.7b --bf16 \\
        --batch-size 8 --seq-len 512 --out benchmarks/results/speed_memory_cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import RESULTS, default_learning_rate, hardware, make_trainer  # noqa: E402

#: name -> (hidden, layers, heads, ffn). Real OPT shapes, except the "-Nl" ones with fewer layers.
SIZES = {
    "tiny": (256, 4, 4, 1024),
    "small": (512, 6, 8, 2048),
    "125m-6l": (768, 6, 12, 3072),
    "125m": (768, 12, 12, 3072),
    "350m": (1024, 24, 16, 4096),
    "1.3b": (2048, 24, 32, 8192),
    "6.7b": (4096, 32, 32, 16384),
}
METHODS = ("full", "lora", "bitfit", "probe", "v", "v_amp", "v_bf16", "forward", "bare_full", "bare_v")
MIXED = {"v_amp", "v_bf16"}
#: The library method each timed method runs (its learning rate is the repository's default for it).
LIBRARY_METHOD = {
    "full": "full",
    "bare_full": "full",
    "forward": "full",
    "lora": "lora",
    "bitfit": "bitfit",
    "probe": "beft",
}
VOCAB = 50272


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--sizes", nargs="+", default=["tiny", "small", "125m-6l"], choices=list(SIZES))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2, help="steps not timed")
    p.add_argument("--steps", type=int, default=6, help="timed steps (the median is reported)")
    p.add_argument("--repeats", type=int, default=2, help="the whole grid, interleaved")
    p.add_argument("--bf16", action="store_true", help="every method under bf16 autocast (GPU setting)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    p.add_argument("--out", type=Path, default=RESULTS / "speed_memory_cpu", help="prefix of .md/.json/.png")
    p.add_argument("--worker", nargs=2, metavar=("SIZE", "METHOD"), help=argparse.SUPPRESS)
    return p


# -- one measurement (runs in a subprocess) ----------------------------------------------------


def make_model(size: str, method: str, bf16: bool):
    """A random-initialised OPT classifier of the given shape (LoRA-wrapped for ``lora``)."""
    import torch
    import transformers as tf

    hidden, layers, heads, ffn = SIZES[size]
    config = tf.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        ffn_dim=ffn,
        word_embed_proj_dim=hidden,
        max_position_embeddings=2048,
        num_labels=2,
        pad_token_id=1,
        dropout=0.0,
        attention_dropout=0.0,
    )
    torch.manual_seed(0)
    model = tf.OPTForSequenceClassification(config)
    if method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        if bf16:
            model = model.to(torch.bfloat16)
        lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
        model = get_peft_model(model, lora)
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    return model


class RandomTokens:
    """A fixed random batch repeated: ``len`` examples of ``seq_len`` tokens with labels."""

    def __init__(self, n: int, seq_len: int):
        import torch

        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, VOCAB, (n, seq_len), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {
            "input_ids": self.ids[i],
            "attention_mask": self.ids[i].new_ones(self.ids.shape[1]),
            "labels": self.labels[i],
        }


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def make_timer(device: str):
    """A TrainerCallback recording the time of every step end (and eval prediction step)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []
            self.state_bytes = 0
            self.trainable = 0

        def _mark(self):
            _sync(device)
            self.marks.append(time.perf_counter())

        def on_train_begin(self, args, state, control, **kwargs):
            self._mark()

        def on_step_end(self, args, state, control, **kwargs):
            self._mark()
            if state.global_step == 2:
                self.state_bytes = state_bytes(kwargs["model"], kwargs.get("optimizer"))
                self.trainable = sum(p.numel() for p in kwargs["model"].parameters() if p.requires_grad)

        def on_prediction_step(self, args, state, control, **kwargs):
            self._mark()

    return StepTimer()


def state_bytes(model, optimizer) -> int:
    """Exact bytes of parameters + gradients of trainable parameters + optimizer state tensors."""
    import torch

    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    opt = 0
    inner = optimizer
    while inner is not None and hasattr(inner, "optimizer") and inner.optimizer is not inner:
        inner = inner.optimizer
    if inner is not None:
        for state in inner.state.values():
            opt += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    return params + grads + opt


def training_args(out: str, opts, method: str, max_steps: int):
    """TrainingArguments for a timing run: no logging, saving or evaluation in the timed window."""
    import transformers as tf

    bf16 = opts.bf16 or method in MIXED
    return tf.TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=opts.batch_size,
        per_device_eval_batch_size=opts.batch_size,
        learning_rate=default_learning_rate(LIBRARY_METHOD.get(method, "v")),
        max_steps=max_steps,
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        use_cpu=opts.device == "cpu",
        bf16=bf16,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        prediction_loss_only=True,
        optim="adamw_torch",
    )


def trainer_for(method: str, model, args, data, timer, max_steps: int):
    """The trainer that runs ``method``."""
    import transformers as tf

    from beft_trainer import BeftConfig, SelectionConfig

    if method in ("full", "lora", "forward"):  # lora: make_model wrapped it already (bf16 base weights)
        return tf.Trainer(model, args, train_dataset=data, eval_dataset=data, callbacks=[timer])
    if method == "probe":
        selection = SelectionConfig(probe_steps=max_steps - 1)
        return make_trainer("beft", model, args, selection, train_dataset=data, callbacks=[timer])
    config = BeftConfig(frozen_dtype="auto" if method == "v_bf16" else None)
    return make_trainer(
        LIBRARY_METHOD.get(method, "v"), model, args, None, config, train_dataset=data, callbacks=[timer]
    )


def bare_loop(method: str, model, opts, n_steps: int) -> tuple[list[float], int]:
    """Full FT or v-only in a bare PyTorch loop (no Trainer); returns step end marks and state bytes."""
    import torch

    from beft_trainer import BeftConfig, BeftTrainer

    if method == "bare_v":  # borrow BeftTrainer's trainable set, then train without it
        with tempfile.TemporaryDirectory() as out:
            trainer = BeftTrainer(model, training_args(out, opts, "v", 2), beft_config=BeftConfig(bias_types=("v",)))
            del trainer
    model.to(opts.device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=default_learning_rate(LIBRARY_METHOD.get(method, "v")))
    data = RandomTokens(opts.batch_size, opts.seq_len)
    batch = {"input_ids": data.ids, "attention_mask": torch.ones_like(data.ids), "labels": data.labels}
    batch = {k: v.to(opts.device) for k, v in batch.items()}
    marks, nbytes = [time.perf_counter()], 0
    for step in range(n_steps):
        with torch.autocast(opts.device, dtype=torch.bfloat16, enabled=opts.bf16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(opts.device)
        marks.append(time.perf_counter())
        if step == 1:
            nbytes = state_bytes(model, optimizer)
    return marks, nbytes


def measure(size: str, method: str, opts) -> dict:
    """Time one (size, method): median step seconds after warm-up, and its memory."""
    import torch

    torch.set_num_threads(opts.threads)
    model = make_model(size, method, opts.bf16)
    if opts.device == "cuda":
        model.to("cuda")
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_bytes()
    max_steps = opts.warmup + opts.steps + 1
    if method.startswith("bare"):
        marks, nbytes = bare_loop(method, model, opts, max_steps)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    else:
        timer = make_timer(opts.device)
        data = RandomTokens(opts.batch_size * max_steps, opts.seq_len)
        with tempfile.TemporaryDirectory() as out:
            trainer = trainer_for(method, model, training_args(out, opts, method, max_steps), data, timer, max_steps)
            trainer.evaluate() if method == "forward" else trainer.train()
        marks, nbytes, trainable = timer.marks, timer.state_bytes, timer.trainable
        if method == "forward":
            nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    steps = [b - a for a, b in zip(marks, marks[1:], strict=False)][opts.warmup : opts.warmup + opts.steps]
    record = {
        "size": size,
        "method": method,
        "step_s": statistics.median(steps),
        "steps_s": steps,
        "state_bytes": nbytes,
        "peak_rss_delta_bytes": max(0, _peak_rss_bytes() - rss_before),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": trainable if method != "forward" else 0,
    }
    if opts.device == "cuda":
        record["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return record


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- orchestration ---------------------------------------------------------------------------


def run_worker(size: str, method: str, opts) -> dict:
    """Run one measurement in a fresh subprocess (own peak memory, no warm caches)."""
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        size,
        method,
        "--device",
        opts.device,
        "--batch-size",
        str(opts.batch_size),
        "--seq-len",
        str(opts.seq_len),
        "--warmup",
        str(opts.warmup),
        "--steps",
        str(opts.steps),
        "--threads",
        str(opts.threads),
    ] + (["--bf16"] if opts.bf16 else [])
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        return {"size": size, "method": method, "error": out.stderr[-2000:]}
    return json.loads(lines[-1][len("RESULT ") :])


def summarise(records: list[dict], methods: list[str], sizes: list[str]) -> dict:
    """Per size and method: median over repeats of step time, of its ratio to full FT, and memory."""
    out: dict = {}
    for size in sizes:
        for method in methods:
            runs = [r for r in records if r["size"] == size and r["method"] == method and "error" not in r]
            if not runs:
                continue
            ratios = []
            for r in runs:
                full = [
                    f
                    for f in records
                    if f["size"] == size
                    and f["method"] == "full"
                    and f.get("repeat") == r["repeat"]
                    and "error" not in f
                ]
                if full:
                    ratios.append(r["step_s"] / full[0]["step_s"])
            entry = {
                "step_ms": 1000 * statistics.median(r["step_s"] for r in runs),
                "step_ms_per_repeat": [round(1000 * r["step_s"], 2) for r in runs],
                "ratio_to_full": statistics.median(ratios) if ratios else None,
                "state_mib": statistics.median(r["state_bytes"] for r in runs) / 2**20,
                "peak_rss_delta_mib": statistics.median(r["peak_rss_delta_bytes"] for r in runs) / 2**20,
                "trainable": runs[0]["trainable"],
                "parameters": runs[0]["parameters"],
            }
            if "cuda_peak_bytes" in runs[0]:
                entry["cuda_peak_gib"] = statistics.median(r["cuda_peak_bytes"] for r in runs) / 2**30
            out.setdefault(size, {})[method] = entry
    return out


def markdown(summary: dict, meta: dict) -> str:
    """The result tables, one per size."""
    gpu = meta["device"] == "cuda"
    lines = [
        f"# Step time and memory through the Trainer ({meta['device']})",
        "",
        f"Hardware: {meta['hardware']}.",
        f"Command: `{meta['command']}`",
        "",
        f"Setting: random-initialised OPT sequence classifiers (vocab {VOCAB}), batch {meta['batch_size']} x "
        f"{meta['seq_len']} tokens, AdamW, {meta['dtype']}; median of {meta['steps']} steps after "
        f"{meta['warmup']} warm-up steps, median over {meta['repeats']} interleaved repeats; ratios taken "
        "to full fine-tuning within the same repeat.",
        "",
    ]
    mem_note = (
        "peak = torch.cuda.max_memory_allocated"
        if gpu
        else "state = exact bytes of parameters + gradients of trainable parameters + optimizer state; "
        "peak RSS delta = process peak RSS minus RSS after building the model (activations, "
        "allocator and temporaries; noisy)"
    )
    lines += [f"Memory: {mem_note}.", ""]
    for size, methods in summary.items():
        hidden, layers, heads, ffn = SIZES[size]
        total = next(iter(methods.values()))["parameters"]
        lines += [
            f"## OPT `{size}` (hidden {hidden}, {layers} layers, ffn {ffn}; {total / 1e6:.1f}M parameters)",
            "",
            "| method | trainable | step ms | vs full FT | "
            + ("peak GiB |" if gpu else "state MiB | vs full | peak RSS delta MiB |"),
            "|---|---|---|---|---|" + ("" if gpu else "---|---|"),
        ]
        full = methods.get("full", {})
        for method, e in methods.items():
            ratio = f"{e['ratio_to_full']:.2f}" if e["ratio_to_full"] is not None else "–"
            if gpu:
                mem = f"{e.get('cuda_peak_gib', float('nan')):.2f} |"
            else:
                mem_ratio = e["state_mib"] / full["state_mib"] if full else float("nan")
                mem = f"{e['state_mib']:.1f} | {mem_ratio:.2f} | {e['peak_rss_delta_mib']:.0f} |"
            lines.append(f"| {method} | {e['trainable']:,} | {e['step_ms']:.1f} | {ratio} | {mem}")
        lines += overhead_lines(methods)
        lines.append("")
    return "\n".join(lines) + "\n"


def overhead_lines(methods: dict) -> list[str]:
    """Trainer overhead over the bare loop, as a sentence."""
    out = []
    for trained, bare in (("full", "bare_full"), ("v", "bare_v")):
        if trained in methods and bare in methods:
            t, b = methods[trained]["step_ms"], methods[bare]["step_ms"]
            out.append(f"Trainer overhead, {trained}: {t:.1f} ms vs {b:.1f} ms bare ({100 * (t / b - 1):+.0f}%).")
    return ["", *out] if out else []


def plot(summary: dict, path: Path, device: str) -> None:
    """Step time and memory relative to full fine-tuning, one bar group per size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(summary)
    methods = [m for m in METHODS if any(m in summary[s] for s in sizes)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / max(1, len(sizes))
    mem_key = "cuda_peak_gib" if device == "cuda" else "state_mib"
    for i, size in enumerate(sizes):
        xs = [j + i * width for j in range(len(methods))]
        full = summary[size].get("full")
        speed = [summary[size].get(m, {}).get("ratio_to_full") or 0 for m in methods]
        mem = [summary[size].get(m, {}).get(mem_key, 0) / full[mem_key] if full else 0 for m in methods]
        axes[0].bar(xs, speed, width, label=size)
        axes[1].bar(xs, mem, width, label=size)
    for ax, title in zip(
        axes,
        (
            "step time / full FT",
            "peak memory / full FT" if device == "cuda" else "param+grad+optimizer bytes / full FT",
        ),
        strict=False,
    ):
        ax.set_xticks([j + width * (len(sizes) - 1) / 2 for j in range(len(methods))], methods, rotation=35)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_title(title)
        ax.legend(title="OPT config")
    fig.suptitle(f"Random-initialised OPT, through the Trainer ({device})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    """Entry point: the grid (default) or one worker measurement."""
    opts = build_parser().parse_args(argv)
    if opts.worker:
        import transformers as tf

        tf.logging.set_verbosity_error()
        print("RESULT " + json.dumps(measure(*opts.worker, opts)), flush=True)
        return
    records = []
    for repeat in range(opts.repeats):
        for size in opts.sizes:
            for method in opts.methods:
                record = run_worker(size, method, opts) | {"repeat": repeat}
                records.append(record)
                print(
                    json.dumps({k: record.get(k) for k in ("repeat", "size", "method", "step_s", "error")}), flush=True
                )
    write_results(records, opts)


def write_results(records: list[dict], opts) -> None:
    """Markdown, JSON and PNG under ``--out``."""
    summary = summarise(records, opts.methods, opts.sizes)
    meta = {
        "device": opts.device,
        "hardware": hardware_name(opts),
        "batch_size": opts.batch_size,
        "seq_len": opts.seq_len,
        "warmup": opts.warmup,
        "steps": opts.steps,
        "repeats": opts.repeats,
        "dtype": "bf16 autocast everywhere" if opts.bf16 else "fp32 (v_amp, v_bf16: bf16 autocast)",
        "command": "python benchmarks/speed_memory.py " + " ".join(sys.argv[1:]),
        "threads": opts.threads,
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{opts.out}.md").write_text(markdown(summary, meta))
    Path(f"{opts.out}.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": records}, indent=1))
    plot(summary, Path(f"{opts.out}.png"), opts.device)
    print(Path(f"{opts.out}.md").read_text())


def hardware_name(opts) -> str:
    """The CPU (and GPU when used), with the thread count the runs used."""
    name = hardware().rsplit(",", 1)[0] + f", {opts.threads} torch thread(s) per run"
    if opts.device == "cuda":
        import torch

        name = torch.cuda.get_device_name() + "; host: " + name
    return name


if __name__ == "__main__":
    main()
