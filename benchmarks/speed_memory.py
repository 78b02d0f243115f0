"""Step time and memory of bias-only training against full fine-tuning, LoRA and the forward pass, through the Trainer.

Random-initialised OPT sequence classifiers (no OPT weights are needed to time a step), built directly
on the device. Every (size, method) runs in its own subprocess so that peak memory is its own; each
finished row (measured, failed or skipped) is appended at once as one JSON line to ``--runs``, so a
run cut short keeps what it measured and a second call resumes. Ratios (to full fine-tuning, to the
forward pass, BEFT run to fixed-v run, DeepSpeed to the plain step) are taken within one repeat, then
the median over repeats is reported.

Methods (all through ``transformers.Trainer`` / ``BeftTrainer``; a TrainerCallback times steps):
  forward          forward pass only (Trainer.evaluate, prediction_loss_only): the floor; bf16 weights under --bf16
  full             full fine-tuning: fp32 master weights (bf16 autocast under --bf16), the Trainer's default AdamW
  lora             LoRA r=8 on q_proj, v_proj (peft, the recipes' settings); bf16 base weights under --bf16
  peft_beft        peft's BEFT tuner (peft.BeftConfig, value projections); bf16 base weights under --bf16
  bitfit           every bias + head (BeftConfig(bias_types="all")), fp32 weights
  probe            BEFT probing phase: q, k, v biases + head (before the switch); bf16 frozen weights under --bf16
  v                BEFT selected phase: value biases + head, fp32 weights
  v_amp            value biases + head, bf16 autocast, fp32 frozen weights (isolates the next row; not under --bf16,
                   where it is the same configuration as v)
  v_bf16           value biases + head, bf16 autocast, bf16 frozen weights (BeftConfig(frozen_dtype="auto"))
  beft_run         a whole BEFT run: probe q, k, v for --probe-steps steps, switch (rewind), value biases to
                   --run-steps; frozen weights as v_bf16 under --bf16
  fixed_v_run      value biases + head for --run-steps steps, the same frozen weights as beft_run
  bare_full        full fine-tuning in a bare PyTorch loop (Trainer overhead = full / bare_full)
  bare_v           value biases + head in a bare PyTorch loop (overhead = v / bare_v)
  ds_zero3         value biases + head under DeepSpeed ZeRO-3 on one GPU (ds_configs/zero3.json or --ds-config)
  ds_zero3_offload the same with parameter and optimizer offload (ds_configs/zero3_offload.json or --ds-config)

LoRA and peft_beft get bf16 base weights under --bf16, so the report compares them with v_bf16. Parameters
trained by every method stay fp32. A row whose weights and optimizer state cannot fit the GPU (16 bytes per
parameter for full fine-tuning) is recorded as skipped with its estimate; a CUDA out-of-memory error, a
crash or a worker past --worker-timeout is a failed row.

    python benchmarks/speed_memory.py run --runs benchmarks/results/speed_memory_cpu_runs.jsonl \\
        --out benchmarks/results/speed_memory_cpu                        # CPU, tiny OPT configs
    python benchmarks/speed_memory.py run --device cuda --sizes 1.3b --bf16 --batch-size 8 --seq-len 512 \\
        --methods forward full lora v_bf16 ... --stop-after 420 --worker-timeout 150 --runs $OUT/sm_1.3b.jsonl
    python benchmarks/speed_memory.py report --runs A.jsonl B.jsonl --out benchmarks/results/speed_memory_cuda
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import RESULTS, append_jsonl, default_learning_rate, hardware, make_trainer, read_jsonl  # noqa: E402

from beft_trainer.plan import DS_CONFIGS, FIT_SHARE, GIB  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
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
#: DeepSpeed rows -> their default config, the shipped ones ``beft plan`` proposes (``--ds-config`` replaces it).
DS_METHODS = {f"ds_{backend}": config for backend, config in DS_CONFIGS.items()}
RUN_METHODS = ("beft_run", "fixed_v_run")
METHODS = (
    "forward", "full", "lora", "peft_beft", "bitfit", "probe", "v", "v_amp", "v_bf16", *RUN_METHODS,
    "bare_full", "bare_v", *DS_METHODS,
)  # fmt: skip
DEFAULT_METHODS = tuple(m for m in METHODS if m not in DS_METHODS)
MIXED = {"v_amp", "v_bf16"}
PEFT = {"lora", "peft_beft"}
#: The library method each timed method runs (its learning rate is the repository's default for it).
LIBRARY_METHOD = {
    "full": "full",
    "bare_full": "full",
    "forward": "full",
    "lora": "lora",
    "peft_beft": "peft_beft",
    "bitfit": "bitfit",
    "probe": "beft",
    "beft_run": "beft",
}
#: Bytes per parameter of fp32 weights, gradients and Adam's two moments (full fine-tuning).
FULL_STATE_BYTES = 16
VOCAB = 50272
KEY_FIELDS = ("size", "method", "repeat", "config")
SETTING_FIELDS = ("device", "bf16", "batch_size", "seq_len", "warmup", "steps", "run_steps", "probe_steps", "threads")
MIB = 2**20


def settings_parser() -> argparse.ArgumentParser:
    """The options every measurement of one results file shares."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2, help="steps not timed")
    p.add_argument("--steps", type=int, default=6, help="timed steps (the median is reported)")
    p.add_argument("--bf16", action="store_true", help="every method under bf16 autocast (GPU setting)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    p.add_argument("--run-steps", type=int, default=60, help="beft_run and fixed_v_run: total steps")
    p.add_argument("--probe-steps", type=int, default=10, help="beft_run: probing steps before the switch")
    p.add_argument("--memory-budget-gib", type=float, help="GPU memory a row may plan for (default: the GPU's total)")
    return p


def build_parser() -> argparse.ArgumentParser:
    """Command-line options: ``run`` (measure into a runs file), ``report`` (tables from runs files)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", parents=[settings_parser()], help="measure rows, one JSON line each")
    run.add_argument("--sizes", nargs="+", default=["tiny", "small", "125m-6l"], choices=list(SIZES))
    run.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS))
    run.add_argument("--repeats", type=int, default=2, help="the whole grid, interleaved")
    run.add_argument("--runs", type=Path, required=True, help="JSON lines file: appended to, and resumed from")
    run.add_argument(
        "--ds-config",
        nargs="+",
        default=[],
        metavar="[METHOD=]PATH",
        help="DeepSpeed config of the ds_* rows (METHOD=PATH for one of them); its file name labels the row",
    )
    run.add_argument("--stop-after", type=float, help="seconds: start no new worker after this")
    run.add_argument("--worker-timeout", type=float, default=600, help="seconds one worker may run (then: failed)")
    run.add_argument("--retry-failed", action="store_true", help="rerun rows recorded as failed")
    run.add_argument("--out", type=Path, help="also write the report of --runs to this prefix at the end")
    report = sub.add_parser("report", help="markdown, JSON and PNG from runs files")
    report.add_argument("--runs", nargs="+", type=Path, required=True)
    report.add_argument("--out", type=Path, default=RESULTS / "speed_memory_cpu", help="prefix of .md/.json/.png")
    worker = sub.add_parser("worker", parents=[settings_parser()])
    worker.add_argument("--size", required=True, choices=list(SIZES))
    worker.add_argument("--method", required=True, choices=list(METHODS))
    worker.add_argument("--config", default="")
    return p


# -- one measurement (runs in a subprocess) ----------------------------------------------------


def opt_config(size: str):
    """The OPTConfig of a size (two labels, no dropout)."""
    import transformers as tf

    hidden, layers, heads, ffn = SIZES[size]
    return tf.OPTConfig(
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


def bf16_weights(method: str, bf16: bool) -> bool:
    """Whether the model of ``method`` is built in bf16 (its trained parameters end up fp32 all the same)."""
    if method == "v_bf16":
        return True
    return bf16 and method in ("forward", "lora", "peft_beft", "probe", *RUN_METHODS, *DS_METHODS)


def frozen_dtype(method: str, bf16: bool) -> str | None:
    """``BeftConfig.frozen_dtype`` of a BeftTrainer method: "auto" where its frozen weights are bf16."""
    if method == "v_bf16" or (bf16 and method in ("probe", *RUN_METHODS)):
        return "auto"
    return None


def make_model(size: str, method: str, opts):
    """A random-initialised OPT classifier, built on the device (under zero.Init for the ds_* rows).

    ``lora`` and ``peft_beft`` come wrapped by peft, their trained parameters in fp32.
    """
    import torch
    import transformers as tf

    dtype = torch.bfloat16 if bf16_weights(method, opts.bf16) else torch.float32
    torch.manual_seed(0)
    if method in DS_METHODS:  # TrainingArguments(deepspeed=...) exist: from_config partitions at construction
        model = tf.AutoModelForSequenceClassification.from_config(opt_config(size), dtype=dtype)
    else:
        with torch.device(opts.device):
            model = tf.AutoModelForSequenceClassification.from_config(opt_config(size), dtype=dtype)
    if method in PEFT:
        from beft_trainer.recipes_support import MethodArguments
        from beft_trainer.recipes_support.methods import wrap_with_peft

        model = wrap_with_peft(model, MethodArguments(method=method), "SEQ_CLS")
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    return model


@functools.cache
def parameter_count(size: str) -> int:
    """Parameters of the plain classifier (counted on the meta device, nothing allocated)."""
    import torch
    import transformers as tf

    with torch.device("meta"):
        model = tf.OPTForSequenceClassification(opt_config(size))
    return sum(p.numel() for p in model.parameters())


def estimate_bytes(size: str, method: str, opts) -> int:
    """GPU bytes of weights, gradients and optimizer state before activations (16 per parameter for full FT)."""
    params = parameter_count(size)
    if method in ("full", "bare_full"):
        return FULL_STATE_BYTES * params
    if method == "ds_zero3_offload":
        return 0
    return (2 if bf16_weights(method, opts.bf16) else 4) * params


def memory_budget(opts) -> int | None:
    """Bytes a row may plan for: ``--memory-budget-gib``, else the GPU's total memory (None on CPU)."""
    if opts.memory_budget_gib is not None:
        return int(opts.memory_budget_gib * GIB)
    if opts.device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[1]
    return None


def skip_reason(size: str, method: str, opts) -> dict | None:
    """A skipped row's fields when the estimate does not fit ``FIT_SHARE`` of the budget, else None."""
    budget = memory_budget(opts)
    estimate = estimate_bytes(size, method, opts)
    if budget is None or estimate <= FIT_SHARE * budget:
        return None
    return {
        "status": "skipped",
        "estimate_bytes": estimate,
        "budget_bytes": budget,
        "reason": f"cannot fit: weights, gradients and optimizer state ~{estimate / GIB:.1f} GiB > "
        f"{FIT_SHARE:.0%} of {budget / GIB:.1f} GiB",
    }


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


def make_timer(device: str, exact_state: bool = True):
    """A TrainerCallback recording train begin, every step end (and eval prediction step), train end."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []
            self.end: float | None = None
            self.state_bytes = None
            self.trainable = 0

        def _mark(self):
            _sync(device)
            self.marks.append(time.perf_counter())

        def on_train_begin(self, args, state, control, **kwargs):
            self._mark()

        def on_step_end(self, args, state, control, **kwargs):
            self._mark()
            if state.global_step == 2:
                model = kwargs["model"]
                self.trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
                if exact_state:
                    self.state_bytes = state_bytes(model, kwargs.get("optimizer"))

        def on_train_end(self, args, state, control, **kwargs):
            _sync(device)
            self.end = time.perf_counter()

        def on_prediction_step(self, args, state, control, **kwargs):
            self._mark()

    return StepTimer()


def _inner_optimizers(optimizer) -> list:
    chain = [optimizer]
    while hasattr(chain[-1], "optimizer") and chain[-1].optimizer is not chain[-1] and len(chain) < 5:
        chain.append(chain[-1].optimizer)
    return chain


def state_bytes(model, optimizer) -> int:
    """Exact bytes of parameters + gradients of trainable parameters + optimizer state tensors."""
    import torch

    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    opt = 0
    if optimizer is not None:
        for state in _inner_optimizers(optimizer)[-1].state.values():
            opt += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    return params + grads + opt


def describe_optimizer(optimizer) -> str:
    """The optimizer's wrappers and class, with fused/foreach where torch's AdamW says, e.g. ``AdamW(fused)``."""
    if optimizer is None:
        return "none"
    names = []
    for opt in _inner_optimizers(optimizer):
        defaults = getattr(opt, "defaults", {}) or {}
        flags = [k for k in ("fused", "foreach") if defaults.get(k)]
        names.append(type(opt).__name__ + (f"({','.join(flags)})" if flags else ""))
    return " > ".join(names)


def training_args(out: str, opts, method: str, max_steps: int, config: str = ""):
    """TrainingArguments for a timing run: the Trainer's default optimizer; no logging, saving or evaluation."""
    import transformers as tf

    extra = {"deepspeed": config} if method in DS_METHODS else {}
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
        bf16=opts.bf16 or method in MIXED,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        prediction_loss_only=True,
        **extra,
    )


def trainer_for(method: str, model, args, data, timer, opts):
    """The trainer that runs ``method``."""
    import transformers as tf

    from beft_trainer import BeftConfig, SelectionConfig

    if method in ("full", "forward", *PEFT):  # lora, peft_beft: make_model wrapped them already
        return tf.Trainer(model, args, train_dataset=data, eval_dataset=data, callbacks=[timer])
    config = BeftConfig(frozen_dtype=frozen_dtype(method, opts.bf16))
    if method in ("probe", "beft_run"):
        probe = args.max_steps - 1 if method == "probe" else opts.probe_steps
        selection = SelectionConfig(probe_steps=probe, candidates=["q", "k", "v"])
        return make_trainer("beft", model, args, selection, config, train_dataset=data, callbacks=[timer])
    library = LIBRARY_METHOD.get(method, "v")
    return make_trainer(library, model, args, None, config, train_dataset=data, callbacks=[timer])


def bare_loop(method: str, model, opts, n_steps: int) -> tuple[list[float], int, str]:
    """Full FT or v-only in a bare PyTorch loop (no Trainer); returns step end marks, state bytes, optimizer."""
    import torch

    from beft_trainer import BeftConfig, BeftTrainer

    if method == "bare_v":  # borrow BeftTrainer's trainable set, then train without it
        with tempfile.TemporaryDirectory() as out:
            trainer = BeftTrainer(model, training_args(out, opts, "v", 2), beft_config=BeftConfig(bias_types=("v",)))
            del trainer
    model.to(opts.device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    lr = default_learning_rate(LIBRARY_METHOD.get(method, "v"))
    optimizer = torch.optim.AdamW(params, lr=lr, fused=opts.device == "cuda")
    data = RandomTokens(opts.batch_size, opts.seq_len)
    batch = {"input_ids": data.ids, "attention_mask": torch.ones_like(data.ids), "labels": data.labels}
    batch = {k: v.to(opts.device) for k, v in batch.items()}
    _reset_peak(opts.device)
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
    return marks, nbytes, describe_optimizer(optimizer)


def _reset_peak(device: str) -> None:
    """Start the peak-memory counter here (after the model and trainer exist, before the first step)."""
    import torch

    if device == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats()


def total_steps(method: str, opts) -> int:
    """Optimizer steps a method runs: warm-up + timed + one untimed last step, or ``--run-steps``."""
    return opts.run_steps if method in RUN_METHODS else opts.warmup + opts.steps + 1


def run_trainer(method: str, model, args, opts) -> dict:
    """Train (or evaluate, for ``forward``) through the Trainer; step marks, state and optimizer."""
    timer = make_timer(opts.device, exact_state=method not in DS_METHODS)
    data = RandomTokens(opts.batch_size * args.max_steps, opts.seq_len)
    trainer = trainer_for(method, model, args, data, timer, opts)
    _reset_peak(opts.device)
    trainer.evaluate() if method == "forward" else trainer.train()
    optimizer = "none (forward only)" if method == "forward" else describe_optimizer(trainer.optimizer)
    result = {"marks": timer.marks, "end": timer.end, "state_bytes": timer.state_bytes}
    result |= {"trainable": timer.trainable, "optimizer": optimizer, "optim": str(args.optim)}
    if method == "forward":
        result["state_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    return result


def measure(size: str, method: str, opts, config: str = "") -> dict:
    """Time one (size, method): median step seconds after warm-up, its memory and what ran."""
    import torch

    torch.set_num_threads(opts.threads)
    skipped = skip_reason(size, method, opts)
    if skipped:
        return skipped
    with tempfile.TemporaryDirectory() as out:
        # before the model: under ZeRO-3, from_config partitions at construction only when the arguments exist
        args = training_args(out, opts, method, total_steps(method, opts), config)
        model = make_model(size, method, opts)
        parameters = sum(_numel(p) for p in model.parameters())
        rss_before = _rss_bytes()
        if method.startswith("bare"):
            marks, nbytes, optimizer = bare_loop(method, model, opts, args.max_steps)
            result = {"marks": marks, "end": None, "state_bytes": nbytes, "optimizer": optimizer, "optim": "bare"}
            result["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        else:
            result = run_trainer(method, model, args, opts)
    marks = result.pop("marks")
    steps = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    window = steps[opts.warmup :] if method in RUN_METHODS else steps[opts.warmup : opts.warmup + opts.steps]
    record = {
        "status": "ok",
        "step_s": statistics.median(window),
        "steps_s": steps,
        "peak_rss_delta_bytes": max(0, _peak_rss_bytes() - rss_before),
        "parameters": parameters,
        "weights_dtype": "bf16" if bf16_weights(method, opts.bf16) else "fp32",
        "frozen_dtype": frozen_dtype(method, opts.bf16),
        "estimate_bytes": estimate_bytes(size, method, opts),
    } | {k: v for k, v in result.items() if k != "end"}
    if method in RUN_METHODS:  # train end minus the end of the last warm-up step (switch included)
        record["run_s"] = result["end"] - marks[opts.warmup]
        record["slowest_step"] = 1 + max(range(len(steps)), key=steps.__getitem__)  # beft_run: where the switch is
    if method == "forward":
        record["trainable"] = 0
    if opts.device == "cuda":
        record["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return record


def _numel(param) -> int:
    """A parameter's full size, also when ZeRO-3 partitioned it."""
    return getattr(param, "ds_numel", None) or param.numel()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker_main(opts) -> None:
    """Measure one row and print it as ``RESULT {json}`` (failures too: CUDA OOM, any exception)."""
    import traceback

    import transformers as tf

    tf.logging.set_verbosity_error()
    try:
        record = measure(opts.size, opts.method, opts, opts.config)
    except Exception as error:  # noqa: BLE001 - every failure becomes a failed row
        oom = type(error).__name__ == "OutOfMemoryError" or "out of memory" in str(error).lower()
        traceback.print_exc()
        reason = ("CUDA out of memory: " if oom else f"{type(error).__name__}: ") + str(error)[:400]
        record = {"status": "failed", "reason": reason}
    record["hardware"] = hardware_name(opts)
    print("RESULT " + json.dumps(record), flush=True)


# -- orchestration ---------------------------------------------------------------------------


def settings(opts) -> dict:
    """The settings a row was measured under (every row of a report must share them)."""
    return {name: getattr(opts, name) for name in SETTING_FIELDS}


def ds_configs(opts) -> dict[str, str]:
    """The DeepSpeed config of each ds_* method: the defaults, replaced by ``--ds-config [METHOD=]PATH``."""
    configs = dict(DS_METHODS)
    for entry in opts.ds_config:
        method, _, path = entry.rpartition("=")
        targets = [method] if method else list(DS_METHODS)
        if method and method not in DS_METHODS:
            raise SystemExit(f"--ds-config {entry}: {method} is not one of {', '.join(DS_METHODS)}.")
        if not config_path(path).is_file():
            raise SystemExit(f"--ds-config {entry}: no file {path}.")
        configs |= dict.fromkeys(targets, path)
    return configs


def config_path(config: str) -> Path:
    """A DeepSpeed config as given (from the current folder), else under the repository (``ds_configs/...``)."""
    path = Path(config)
    return path if path.is_file() else ROOT / path


def worker_command(size: str, method: str, config: str, opts) -> list[str]:
    """The subprocess command measuring one row with the run's settings."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "worker", "--size", size, "--method", method]
    cmd += ["--config", str(config_path(config))] if config else []
    for name in SETTING_FIELDS + ("memory_budget_gib",):
        value = getattr(opts, name)
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            cmd += [flag] if value else []
        elif value is not None:
            cmd += [flag, str(value)]
    return cmd


def free_port() -> int:
    """A TCP port free right now (DeepSpeed's rendezvous for a single process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(method: str) -> tuple[dict, str | None]:
    """The worker's environment (a one-process world for DeepSpeed) and its shared-memory name prefix."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    if method not in DS_METHODS:
        return env, None
    port = str(free_port())
    env |= {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    return env, f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_"


def remove_shared_memory(prefix: str | None) -> None:
    """Delete the /dev/shm buffers CPU DeepSpeed left under this worker's (unique) address and port."""
    if prefix and os.path.isdir("/dev/shm"):
        for name in os.listdir("/dev/shm"):
            if name.startswith(prefix):
                Path("/dev/shm", name).unlink(missing_ok=True)


def run_worker(size: str, method: str, config: str, opts) -> dict:
    """Run one measurement in a fresh subprocess (own peak memory); a timeout or crash is a failed row."""
    env, shm_prefix = worker_env(method)
    proc = subprocess.Popen(
        worker_command(size, method, config, opts),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=opts.worker_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"status": "failed", "reason": f"timed out after {opts.worker_timeout:g} s (--worker-timeout)"}
    finally:
        remove_shared_memory(shm_prefix)
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        return {"status": "failed", "reason": f"exit status {proc.returncode}: {stderr[-1500:]}"}
    return json.loads(lines[-1][len("RESULT ") :])


def row_key(row: dict) -> tuple:
    """What identifies a row: (size, method, repeat, config)."""
    return tuple(row.get(name) or "" for name in KEY_FIELDS)


def plan_rows(opts) -> list[dict]:
    """Every row of the grid in run order (repeat, size, method), with its DeepSpeed config."""
    methods = [m for m in opts.methods if not (opts.bf16 and m == "v_amp")]
    if len(methods) < len(opts.methods):
        print("--bf16: v_amp dropped (under --bf16 it is the same configuration as v).", flush=True)
    configs = ds_configs(opts)
    return [
        {"size": size, "method": method, "repeat": repeat, "config": configs.get(method, "")}
        for repeat in range(opts.repeats)
        for size in opts.sizes
        for method in methods
    ]


def check_run_options(opts) -> None:
    """Refuse settings the whole-run rows cannot time, and a runs file holding other settings."""
    if any(m in RUN_METHODS for m in opts.methods) and not opts.warmup < opts.probe_steps < opts.run_steps:
        raise SystemExit("beft_run needs --warmup < --probe-steps < --run-steps (the switch inside the timed window).")
    mine = settings(opts)
    for row in read_jsonl(opts.runs):
        theirs = {k: row.get(k) for k in SETTING_FIELDS}
        if theirs != mine:
            raise SystemExit(f"{opts.runs} holds rows measured with {theirs}, not {mine}: use another --runs file.")


def run_grid(opts) -> None:
    """Measure every row not yet in ``--runs``, appending one JSON line per finished row."""
    check_run_options(opts)
    start = time.monotonic()
    done = {row_key(r) for r in read_jsonl(opts.runs) if r["status"] != "failed" or not opts.retry_failed}
    todo = [row for row in plan_rows(opts) if row_key(row) not in done]
    print(f"{len(todo)} rows to run ({len(done)} already in {opts.runs}).", flush=True)
    for index, row in enumerate(todo):
        if opts.stop_after is not None and time.monotonic() - start > opts.stop_after:
            print(f"--stop-after {opts.stop_after:g} s: stopping, {len(todo) - index} rows not started.", flush=True)
            break
        clock = time.monotonic()
        result = run_worker(row["size"], row["method"], row["config"], opts)
        record = row | settings(opts) | result | {"worker_s": round(time.monotonic() - clock, 1)}
        if row["config"]:
            record["ds_config"] = json.loads(config_path(row["config"]).read_text())
        record["command"] = "python benchmarks/speed_memory.py " + " ".join(sys.argv[1:])
        append_jsonl(opts.runs, record)
        brief = {k: record.get(k) for k in ("repeat", "size", "method", "status", "step_s", "reason")}
        print(json.dumps(brief), flush=True)
    if opts.out:
        write_report([opts.runs], opts.out)


# -- the report ------------------------------------------------------------------------------


def label(row: dict) -> str:
    """A row's name in tables: the method, and the DeepSpeed config's file name."""
    return f"{row['method']} ({Path(row['config']).name})" if row.get("config") else row["method"]


def latest_rows(paths: list[Path]) -> list[dict]:
    """Every runs file's rows, the last one per key (a measured row over a failed one)."""
    rows: dict[tuple, dict] = {}
    for path in paths:
        for row in read_jsonl(path):
            key = row_key(row)
            if row["status"] == "ok" or rows.get(key, {}).get("status") != "ok":
                rows[key] = row
    return list(rows.values())


def selected_method(bf16: bool) -> str:
    """The row of the BEFT selected phase to compare: v_bf16 under --bf16 (bf16 frozen weights), else v."""
    return "v_bf16" if bf16 else "v"


def memory_bytes(row: dict) -> int | None:
    """The memory a row is compared by: the CUDA peak on a GPU, else exact parameter+gradient+optimizer bytes."""
    return row.get("cuda_peak_bytes") or row.get("state_bytes")


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def repeat_ratios(row: dict, refs: dict[str, dict], bf16: bool) -> dict:
    """One row's ratios to the rows of the same size and repeat (``refs``: label -> row)."""
    out = {}
    for name, ref in (("full", refs.get("full")), ("forward", refs.get("forward"))):
        out[f"step_vs_{name}"] = _ratio(row["step_s"], ref and ref["step_s"])
        out[f"mem_vs_{name}"] = _ratio(memory_bytes(row), ref and memory_bytes(ref))
    if row["method"] in DS_METHODS:
        plain = refs.get(selected_method(bf16))
        out["step_vs_plain"] = _ratio(row["step_s"], plain and plain["step_s"])
        out["mem_vs_plain"] = _ratio(memory_bytes(row), plain and memory_bytes(plain))
    if row["method"] == "beft_run":
        fixed = refs.get("fixed_v_run")
        out["run_vs_fixed"] = _ratio(row.get("run_s"), fixed and fixed.get("run_s"))
    return out


def summarise(rows: list[dict], bf16: bool) -> dict:
    """Per size and label: medians over repeats of step time, memory and the within-repeat ratios."""
    ok = [r for r in rows if r["status"] == "ok"]
    by_repeat: dict[tuple, dict] = {}
    for r in ok:
        by_repeat.setdefault((r["size"], r["repeat"]), {})[label(r)] = r
    out: dict = {}
    for size in [s for s in SIZES if any(r["size"] == s for r in ok)]:
        for name in sorted({label(r) for r in ok if r["size"] == size}, key=_label_order):
            runs = [r for r in ok if r["size"] == size and label(r) == name]
            ratios = [repeat_ratios(r, by_repeat[(size, r["repeat"])], bf16) for r in runs]
            entry = {
                "method": runs[0]["method"],
                "config": runs[0].get("config") or None,
                "repeats": len(runs),
                "step_ms": 1000 * _median(r["step_s"] for r in runs),
                "step_ms_per_repeat": [round(1000 * r["step_s"], 2) for r in runs],
                "state_mib": _mib(_median(r.get("state_bytes") for r in runs)),
                "peak_rss_delta_mib": _mib(_median(r.get("peak_rss_delta_bytes") for r in runs)),
                "cuda_peak_gib": _gib(_median(r.get("cuda_peak_bytes") for r in runs)),
                "run_s": _median(r.get("run_s") for r in runs),
                "slowest_step": runs[0].get("slowest_step"),
                "slowest_step_ms": _median(_slowest_ms(r) for r in runs),
                "trainable": runs[0].get("trainable"),
                "parameters": runs[0].get("parameters"),
                "weights_dtype": runs[0].get("weights_dtype"),
                "optimizer": runs[0].get("optimizer"),
            }
            for key in sorted({k for r in ratios for k in r}):
                entry[key] = _median(r.get(key) for r in ratios)
            out.setdefault(size, {})[name] = entry
    return out


def _slowest_ms(row: dict) -> float | None:
    return 1000 * max(row["steps_s"]) if row.get("slowest_step") and row.get("steps_s") else None


def _label_order(name: str) -> tuple:
    method = name.split(" ")[0]
    return (METHODS.index(method) if method in METHODS else len(METHODS), name)


def _mib(value):
    return None if value is None else value / MIB


def _gib(value):
    return None if value is None else value / GIB


#: (size, what, method, summary key, upper bound, needs GPU peaks); the selected phase is v_bf16 under --bf16, else v.
TARGETS = (
    ("1.3b", "selected phase step <= 2.15x the forward pass", "selected", "step_vs_forward", 2.15, False),
    ("1.3b", "selected phase step <= 0.60x the full FT step", "selected", "step_vs_full", 0.60, False),
    ("1.3b", "selected phase peak memory <= 0.40x full FT's peak", "selected", "mem_vs_full", 0.40, True),
    ("1.3b", "whole BEFT run within 5% of a fixed-v run of the same length", "beft_run", "run_vs_fixed", 1.05, False),
    ("6.7b", "ZeRO-3 step within 1.5x of the plain step", "ds_zero3", "step_vs_plain", 1.5, False),
    ("6.7b", "ZeRO-3 with offload: peak <= 18 GiB", "ds_zero3_offload", "cuda_peak_gib", 18.0, True),
)


def target_lines(summary: dict, bf16: bool, gpu: bool) -> list[str]:
    """One line per target and matching row: the measured value and met / not met, or why it is not measured."""
    lines = []
    for size, what, method, key, bound, needs_gpu in TARGETS:
        method = selected_method(bf16) if method == "selected" else method
        if needs_gpu and not gpu:
            lines.append(f"- OPT-{size}: {what}: not measured (no GPU peak memory on CPU).")
            continue
        entries = summary.get(size, {})
        values = {n: e[key] for n, e in entries.items() if e["method"] == method and e.get(key) is not None}
        if not values:
            lines.append(f"- OPT-{size}: {what}: not measured (rows missing: {method} or its reference).")
        for name, value in values.items():
            verdict = "met" if value <= bound else "not met"
            lines.append(f"- OPT-{size}: {what}: {name} {value:.2f} -> **{verdict}**.")
    return lines


def _fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def size_table(size: str, entries: dict, gpu: bool) -> list[str]:
    """The table of one size: step time and memory, each as ratios to full FT and to the forward pass."""
    hidden, layers, heads, ffn = SIZES[size]
    total = next(iter(entries.values()))["parameters"] or 0
    mem = "peak GiB" if gpu else "state MiB"
    lines = [
        f"## OPT `{size}` (hidden {hidden}, {layers} layers, ffn {ffn}; {total / 1e6:.1f}M parameters)",
        "",
        f"| method | weights | trainable | optimizer | step ms | vs full | vs forward | {mem} | vs full | vs forward |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in entries.items():
        memory = e["cuda_peak_gib"] if gpu else e["state_mib"]
        trainable = "–" if e["trainable"] is None else f"{e['trainable']:,}"
        lines.append(
            f"| {name} | {e['weights_dtype']} | {trainable} | {e['optimizer']} | {e['step_ms']:.1f} | "
            f"{_fmt(e.get('step_vs_full'))} | {_fmt(e.get('step_vs_forward'))} | {_fmt(memory)} | "
            f"{_fmt(e.get('mem_vs_full'))} | {_fmt(e.get('mem_vs_forward'))} |"
        )
    return lines + [""] + comparison_lines(entries) + [""]


def comparison_lines(entries: dict) -> list[str]:
    """Sentences: LoRA against v_bf16, the whole runs, DeepSpeed against the plain step, Trainer overhead."""
    out = []
    for other in ("lora", "peft_beft"):
        if other in entries and "v_bf16" in entries:
            a, b = entries[other], entries["v_bf16"]
            mem = _ratio(a["cuda_peak_gib"] or a["state_mib"], b["cuda_peak_gib"] or b["state_mib"])
            out.append(
                f"- {other} ({a['weights_dtype']} base weights) vs v_bf16 (bf16 frozen weights): step "
                f"{_fmt(_ratio(a['step_ms'], b['step_ms']))}x, memory {_fmt(mem)}x."
            )
    if "beft_run" in entries:
        e, fixed = entries["beft_run"], entries.get("fixed_v_run", {})
        line = f"- Whole run: beft_run {_fmt(e['run_s'])} s vs fixed_v_run {_fmt(fixed.get('run_s'))} s "
        line += f"(ratio {_fmt(e.get('run_vs_fixed'), 3)})"
        if e.get("slowest_step_ms") is not None:
            line += f"; its slowest step (step {e['slowest_step']}, the switch) {e['slowest_step_ms']:.0f} ms"
            line += f" against a median step of {e['step_ms']:.0f} ms"
        out.append(line + ".")
    for name, e in entries.items():
        if "step_vs_plain" in e:
            out.append(
                f"- {name}: step {_fmt(e['step_vs_plain'])}x the plain step, memory {_fmt(e['mem_vs_plain'])}x."
            )
    for trained, bare in (("full", "bare_full"), ("v", "bare_v")):
        if trained in entries and bare in entries:
            t, b = entries[trained]["step_ms"], entries[bare]["step_ms"]
            out.append(f"- Trainer overhead, {trained}: {t:.1f} ms vs {b:.1f} ms bare ({100 * (t / b - 1):+.0f}%).")
    return out


def not_measured_lines(rows: list[dict]) -> list[str]:
    """The failed and skipped rows, with their reasons."""
    missing = [r for r in rows if r["status"] != "ok"]
    if not missing:
        return []
    lines = ["## Failed and skipped rows", "", "| size | method | repeat | status | reason |", "|---|---|---|---|---|"]
    for r in sorted(missing, key=lambda r: (r["size"], _label_order(label(r)), r["repeat"])):
        reason = " ".join(str(r.get("reason", "")).split()).replace("|", "/")[:300]
        lines.append(f"| {r['size']} | {label(r)} | {r['repeat']} | {r['status']} | {reason} |")
    return lines + [""]


def report_meta(rows: list[dict]) -> dict:
    """The shared settings of the rows (refuses rows measured under different settings), hardware, commands."""
    kinds = {json.dumps({k: r.get(k) for k in SETTING_FIELDS}, sort_keys=True) for r in rows}
    if len(kinds) != 1:
        raise SystemExit(f"The runs files mix settings: {sorted(kinds)}; report them separately.")
    meta = json.loads(kinds.pop())
    meta["hardware"] = sorted({r["hardware"] for r in rows if r.get("hardware")})
    meta["commands"] = sorted({r["command"] for r in rows if r.get("command")})
    meta["repeats"] = 1 + max(r["repeat"] for r in rows)
    return meta


def markdown(summary: dict, rows: list[dict], meta: dict) -> str:
    """The report: setting, targets, one table per size, failed and skipped rows."""
    gpu, bf16 = meta["device"] == "cuda", meta["bf16"]
    dtype = (
        "bf16 autocast everywhere (v_amp dropped: the same as v)" if bf16 else "fp32 (v_amp, v_bf16: bf16 autocast)"
    )
    lines = [
        f"# Step time and memory through the Trainer ({meta['device']})",
        "",
        f"Hardware: {'; '.join(meta['hardware']) or 'unknown'}.",
        "Commands: " + "; ".join(f"`{c}`" for c in meta["commands"]),
        "",
        f"Setting: random-initialised OPT sequence classifiers (vocab {VOCAB}), batch {meta['batch_size']} x "
        f"{meta['seq_len']} tokens, {dtype}; median of {meta['steps']} steps after {meta['warmup']} warm-up "
        f"steps, median over up to {meta['repeats']} interleaved repeats; every ratio is taken within one repeat "
        "(to full fine-tuning when it ran, to the forward pass), then the median.",
        "",
        "Memory: "
        + (
            "peak = torch.cuda.max_memory_allocated from the first step (the counter is reset once the trainer exists)."
            if gpu
            else "state = exact bytes of parameters + gradients of trainable parameters + optimizer state."
        ),
        f"Whole runs: beft_run (probe q,k,v for {meta['probe_steps']} steps, switch with rewind, value biases after) and "
        f"fixed_v_run (value biases only), {meta['run_steps']} steps each, the same frozen weights; time = train end "
        f"minus the end of warm-up step {meta['warmup']}.",
        "LoRA and peft_beft train on bf16 base weights under --bf16, v keeps fp32 frozen weights: compare them with "
        "v_bf16 (bf16 frozen weights), as the lines under each table do.",
        "",
        "## Targets",
        "",
        *target_lines(summary, bf16, gpu),
        "",
    ]
    for size, entries in summary.items():
        lines += size_table(size, entries, gpu)
    lines += not_measured_lines(rows)
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path, gpu: bool) -> None:
    """Step time and memory relative to full FT and to the forward pass; missing rows have no bar."""
    from matplotlib.figure import Figure  # the Figure API: no global backend

    sizes = list(summary)
    labels = sorted({n for s in sizes for n in summary[s]}, key=_label_order)
    fig = Figure(figsize=(max(10, 0.7 * len(labels) * 2), 8))
    axes = fig.subplots(2, 2)
    width = 0.8 / max(1, len(sizes))
    mem = "peak memory" if gpu else "param+grad+optimizer bytes"
    panels = (("step_vs_full", "step time / full FT"), ("step_vs_forward", "step time / forward pass"))
    panels += (("mem_vs_full", f"{mem} / full FT"), ("mem_vs_forward", f"{mem} / forward pass"))
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        for i, size in enumerate(sizes):
            points = [(j, summary[size][n].get(key)) for j, n in enumerate(labels) if n in summary[size]]
            points = [(j + i * width, v) for j, v in points if v is not None]
            if points:
                ax.bar(*zip(*points, strict=True), width, label=size)
                ax.legend(title="OPT config")
        ax.set_xticks([j + width * (len(sizes) - 1) / 2 for j in range(len(labels))], labels, rotation=40, ha="right")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_title(title + " (no bar: not measured)")
    fig.suptitle("Random-initialised OPT, through the Trainer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(paths: list[Path], out: Path) -> None:
    """Markdown, JSON (settings, summary with ratios, every row) and PNG under the prefix ``out``."""
    rows = latest_rows(paths)
    if not rows:
        raise SystemExit(f"No rows in {', '.join(map(str, paths))}.")
    meta = report_meta(rows)
    summary = summarise(rows, meta["bf16"])
    out.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(summary, rows, meta)
    Path(f"{out}.md").write_text(text)
    Path(f"{out}.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": rows}, indent=1))
    if summary:
        plot(summary, Path(f"{out}.png"), meta["device"] == "cuda")
    print(text)


def hardware_name(opts) -> str:
    """The GPU (where there is one) and CPU, with the thread count the runs used."""
    return hardware().rsplit(",", 1)[0] + f", {opts.threads} torch thread(s) per run"


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``run``, ``report``, or (internal) ``worker``."""
    opts = build_parser().parse_args(argv)
    if opts.command == "worker":
        worker_main(opts)
    elif opts.command == "run":
        run_grid(opts)
    else:
        write_report(opts.runs, opts.out)


if __name__ == "__main__":
    main()
