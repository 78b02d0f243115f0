"""``beft plan``'s memory model (the command: ``cli_plan``): peak GPU memory per way to run, the fastest that fits.

Reads a model's config only (never its weights), builds the model on the meta device to count
its parameters, and estimates bytes per GPU with this model (t = batch x seq tokens per GPU,
h hidden, f MLP width, a heads, L layers, v vocabulary, P = M matrix + V vector scalars,
T trained scalars = every bias, the most any bias method trains; N GPUs):

- frozen weights: plain and DDP ``2M + 4V`` (``BeftConfig(frozen_dtype="auto")``: matrices bf16,
  vectors fp32); ZeRO-3 ``2P/N`` + its gathered working set ``2 min(P, 1e9)``
  (``stage3_max_live_parameters`` in ds_configs/); ZeRO-3 offload: the working set only.
- trained vectors: ``12T`` (fp32 gradient and Adam's two moments); DeepSpeed ``(2 + 16) T / N``.
- activations per layer, bf16 autocast, SDPA: ``18th + 2tf + 4tas``: what autograd keeps for the
  backward pass (both LayerNorms' inputs and statistics, q, k, v and the attention output, the
  dropout masks, the MLP activation 2tf (6tf when gated: gate, up, act(gate)), the attention's
  fp32 log-sum-exp 4tas). Frozen weights save no inputs: a linear layer keeps its input only for
  its weight's gradient. Torch's saved tensors of random OPT configs on CPU: 6-7% below this.
  With gradient checkpointing: ``2th`` per layer (its bf16 input: the embeddings are frozen bf16
  matrices, so the residual stream is bf16) plus one layer's activations, recomputed in backward.
- logits: ``14tv`` (bf16 logits, their fp32 copy, the log-softmax output, the fp32 gradient); checked
  only inside the OPT-6.7B totals.

An option fits when its estimate is at most ``FIT_SHARE`` of ``--gpu-memory`` (the rest: CUDA
context, allocator fragmentation). ``EXPECTED_ERROR`` is the estimate's largest error against the
measured peaks (docs/recipes.md lists them); on the GPU the estimates lie above the peaks by up to
``GPU_OVERESTIMATE`` (never below them). Step times relative to one plain GPU, measured on an H100
(OPT-6.7B, batch 8x512, bf16; benchmarks/results/speed_memory_h100.md): a step costs 2.2 forwards, so
checkpointing's extra forward makes it ~1.45x; ZeRO-3 1.8x (381 vs 211 ms); ZeRO-3 parameter offload
4.1x (870 vs 211 ms).
ZeRO-1/2 partition optimizer state and gradients, which bias-only training hardly has: never chosen.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import CommandError, one_line

GIB = 2**30
FIT_SHARE = 0.9
EXPECTED_ERROR = 0.10
GPU_OVERESTIMATE = 0.25
ZERO3_MAX_LIVE_PARAMETERS = 1_000_000_000
SLOWDOWN = {"plain": 1.0, "ddp": 1.0, "zero3": 1.8, "zero3_offload": 4.1}
CHECKPOINTING_SLOWDOWN = 1 + 1 / 2.2
DS_CONFIGS = {"zero3": "ds_configs/zero3.json", "zero3_offload": "ds_configs/zero3_offload.json"}
_NOT_CAUSAL = "not a decoder-only causal LM: beft plan sizes those, trained with recipes/run_opt.py."
_LABELS = {"plain": "plain bf16-frozen", "ddp": "DDP", "zero3": "ZeRO-3", "zero3_offload": "ZeRO-3 + CPU offload"}


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs to know about a model, read from its config and meta parameters."""

    name: str
    matrix_params: int
    vector_params: int
    trained_params: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    gated_mlp: bool = False

    @property
    def total_params(self) -> int:
        """Every parameter scalar (tied weights once)."""
        return self.matrix_params + self.vector_params


@dataclass(frozen=True)
class Option:
    """One way to run: its memory per GPU and CPU, and its step time relative to one plain GPU."""

    backend: str
    gpus: int
    checkpointing: bool
    gpu_bytes: dict[str, int]
    cpu_bytes: int = 0

    @property
    def peak(self) -> int:
        """Estimated peak bytes per GPU."""
        return sum(self.gpu_bytes.values())

    @property
    def slowdown(self) -> float:
        """Step time relative to a plain single-GPU step without checkpointing."""
        return SLOWDOWN[self.backend] * (CHECKPOINTING_SLOWDOWN if self.checkpointing else 1.0)

    def describe(self) -> str:
        """A short name: backend, GPUs, checkpointing."""
        extra = ", gradient checkpointing" if self.checkpointing else ""
        return f"{_LABELS[self.backend]} on {self.gpus} GPU{'s' if self.gpus > 1 else ''}{extra}"


def activation_bytes(shape: ModelShape, tokens: int, seq_len: int, checkpointing: bool = False) -> int:
    """Bytes autograd keeps for the backward pass of one GPU's micro-batch (bf16 autocast, SDPA)."""
    h, f = shape.hidden, shape.intermediate
    batch = tokens // seq_len
    per_layer = 18 * tokens * h + (6 if shape.gated_mlp else 2) * tokens * f + 4 * batch * shape.heads * seq_len
    if checkpointing:
        return shape.layers * 2 * tokens * h + per_layer
    return shape.layers * per_layer


def logits_bytes(shape: ModelShape, tokens: int) -> int:
    """Peak bytes of the vocabulary logits around the loss (bf16, fp32 copy, log-softmax, gradient)."""
    return 14 * tokens * shape.vocab


def estimate(shape: ModelShape, gpus: int, batch_size: int, seq_len: int) -> list[Option]:
    """Every option, each with and without gradient checkpointing (``batch_size`` is per GPU)."""
    tokens = batch_size * seq_len
    P, T = shape.total_params, shape.trained_params
    working_set = 2 * min(P, ZERO3_MAX_LIVE_PARAMETERS)
    base = {
        "plain": {"weights": 2 * shape.matrix_params + 4 * shape.vector_params, "trained": 12 * T},
        "zero3": {"weights": -(-2 * P // gpus) + working_set, "trained": -(-18 * T // gpus)},
        "zero3_offload": {"weights": working_set, "trained": 0},
    }
    options = []
    for backend, memory in base.items():
        backend = "ddp" if backend == "plain" and gpus > 1 else backend
        cpu = 2 * P + 18 * T if backend == "zero3_offload" else 0
        for checkpointing in (False, True):
            gpu = memory | {
                "activations": activation_bytes(shape, tokens, seq_len, checkpointing),
                "logits": logits_bytes(shape, tokens),
            }
            options.append(Option(backend, gpus, checkpointing, gpu, cpu))
    return options


def choose(options: list[Option], gpu_memory_gib: float, cpu_memory_gib: float | None = None) -> Option | None:
    """The fastest option whose estimate fits ``FIT_SHARE`` of each GPU (and the CPU memory, if given)."""
    budget = FIT_SHARE * gpu_memory_gib * GIB
    fitting = [
        o
        for o in options
        if o.peak <= budget and (cpu_memory_gib is None or o.cpu_bytes <= FIT_SHARE * cpu_memory_gib * GIB)
    ]
    return min(fitting, key=lambda o: o.slowdown, default=None)


# -- the model's shape, from its config only -----------------------------------------------------


def load_config(model: str):
    """The transformers config of ``model``: a config.json, a folder with one, an alias or a cached Hub id."""
    import transformers

    from .cli import MODEL_ALIASES, resolve_model

    model = resolve_model(model) if model.lower() in MODEL_ALIASES else model
    is_file = os.path.isfile(model)
    if is_file and not model.endswith(".json"):
        raise CommandError(f"{model} is a file but not a config.json: pass the config, its folder or a Hub id.")
    if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "config.json")):
        raise CommandError(f"{model} has no config.json: not a transformers model folder.")
    try:
        if is_file:
            config_dict = transformers.PretrainedConfig.get_config_dict(model)[0]
            return transformers.AutoConfig.for_model(**config_dict)
        return transformers.AutoConfig.from_pretrained(model)
    # A user's file or the Hub fail in many ways (bad JSON, unknown model_type, not cached offline):
    # each ends in one line here.
    except Exception as error:
        if not is_file and not os.path.isdir(model) and isinstance(error, OSError):
            raise CommandError(
                f"{model} is neither a config.json, a model folder, nor a Hub id in the local Hugging Face cache "
                "(nothing is downloaded offline): pass the model's config.json."
            ) from error
        detail = one_line(error)[:300]
        raise CommandError(f"cannot read the config of {model}: {type(error).__name__}: {detail}") from error


def read_shape(model: str) -> ModelShape:
    """The ``ModelShape`` of a causal LM, its parameters counted on the meta device (nothing allocated)."""
    config = load_config(model)
    built = _build_causal_decoder(model, config)
    params = dict(built.named_parameters())  # tied weights once
    matrix = sum(p.numel() for p in params.values() if p.dim() >= 2)
    vector = sum(p.numel() for p in params.values() if p.dim() < 2)
    trained = sum(p.numel() for n, p in params.items() if n.endswith(".bias"))
    hidden = config.hidden_size
    intermediate = next(
        (v for k in ("intermediate_size", "ffn_dim", "n_inner") if (v := getattr(config, k, None))), 4 * hidden
    )
    return ModelShape(
        name=model,
        matrix_params=matrix,
        vector_params=vector,
        trained_params=trained,
        hidden=hidden,
        layers=config.num_hidden_layers,
        heads=config.num_attention_heads,
        intermediate=intermediate,
        vocab=config.vocab_size,
        gated_mlp=any(".gate_proj." in n for n in params),
    )


def _build_causal_decoder(model: str, config):
    """The model on the meta device; refused unless a decoder-only causal LM, what plan's memory model covers."""
    import torch
    import transformers

    encoder_decoder = config.is_encoder_decoder  # read first: BartForCausalLM's __init__ sets it False
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # BertLMHeadModel's "add is_decoder=True": refused below in one line
    try:
        with torch.device("meta"):
            built = transformers.AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as error:
        raise CommandError(f"{model}: {type(config).__name__} {_NOT_CAUSAL}") from error
    finally:
        transformers.logging.set_verbosity(verbosity)
    # BERT-like encoders build as causal LMs too (BertLMHeadModel): no attention module set causal marks them.
    causal = [m.is_causal for m in built.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    if encoder_decoder or (causal and not any(causal)):
        kind = "an encoder-decoder" if encoder_decoder else "an encoder (no attention layer is causal)"
        raise CommandError(f"{model}: {type(config).__name__} is {kind}, {_NOT_CAUSAL}")
    return built
