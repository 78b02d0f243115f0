"""Tiny random models and datasets built in code, for fast CPU tests."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 64


def tiny_bert(num_labels: int = 2, seed: int = 0) -> tf.PreTrainedModel:
    """A 2-layer BERT classifier with random weights and non-zero biases."""
    torch.manual_seed(seed)
    config = tf.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return randomize_biases(tf.BertForSequenceClassification(config))


def tiny_model(model_type: str, num_labels: int = 2, seed: int = 0, **config: object) -> tf.PreTrainedModel:
    """A tiny sequence classifier of the given architecture (``config`` overrides its config)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, num_labels=num_labels, pad_token_id=0, **config)
    configs = {
        "bert": lambda: tf.BertConfig(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, **common
        ),
        "roberta": lambda: tf.RobertaConfig(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, **common
        ),
        "distilbert": lambda: tf.DistilBertConfig(dim=16, n_layers=2, n_heads=2, hidden_dim=32, **common),
        "electra": lambda: tf.ElectraConfig(
            hidden_size=16,
            embedding_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            **common,
        ),
        "mpnet": lambda: tf.MPNetConfig(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, **common
        ),
        "opt": lambda: tf.OPTConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            ffn_dim=32,
            word_embed_proj_dim=16,
            bos_token_id=1,
            eos_token_id=2,
            **common,
        ),
        "gpt2": lambda: tf.GPT2Config(n_embd=16, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=2, **common),
        "qwen2": lambda: tf.Qwen2Config(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=32,
            **common,
        ),
        "llama": lambda: tf.LlamaConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=32,
            **common,
        ),
    }
    model = tf.AutoModelForSequenceClassification.from_config(configs[model_type]())
    return randomize_biases(model)


def randomize_biases(model: torch.nn.Module) -> torch.nn.Module:
    """Pretrained biases are not zero; random ones keep the projection score meaningful."""
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias":
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


class TokenDataset(torch.utils.data.Dataset):
    """A learnable toy task: the label is whether token 5 occurs in the sequence."""

    def __init__(self, size: int = 64, length: int = 12, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(6, VOCAB, (size, length), generator=generator)
        self.labels = torch.randint(0, 2, (size,), generator=generator)
        positions = torch.randint(1, length, (size,), generator=generator)
        self.input_ids[self.labels == 1, positions[self.labels == 1]] = 5
        self.input_ids[:, 0] = 1

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[i],
            "attention_mask": torch.ones_like(self.input_ids[i]),
            "labels": self.labels[i],
        }


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def training_args(output_dir, **overrides) -> tf.TrainingArguments:
    """CPU TrainingArguments for a short, deterministic run."""
    defaults = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        max_steps=12,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    defaults.update(overrides)
    return tf.TrainingArguments(**defaults)


def qkv_coherence(model: torch.nn.Module, backward_passes) -> dict[str, list[float]]:
    """Per q/k/v type, each layer's gradient coherence after ``backward_passes(model)`` has run.

    ``backward_passes`` runs the forward and backward passes whose gradients the probe collects.
    """
    from beft_trainer import find_biases
    from beft_trainer.probe import ProbeStatistics
    from beft_trainer.scores import gradient_coherence

    layout = find_biases(model)
    names = layout.names(("q", "k", "v"))
    params = dict(model.named_parameters())
    probe = ProbeStatistics()
    probe.track({n: params[n] for n in names}, {n: params[n].shape for n in names})
    probe.track_tokens(model, names)
    backward_passes(model)
    probe.stop()
    model.zero_grad()
    return {
        t: gradient_coherence(
            [probe.squared_grads[v.name] for v in layout.vectors[t]],
            [float(probe.token_squared[v.name]) for v in layout.vectors[t]],
        )
        for t in ("q", "k", "v")
    }


class AtSwitch(tf.TrainerCallback):
    """Copies every parameter at ``step`` (after the selection: pass it after the selection callback)."""

    def __init__(self, step: int):
        self.step, self.values = step, {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self.values = snapshot(model)


def assert_frozen_after_switch(trainer, at_switch, pretrained):
    """Every parameter outside the still-training groups kept its switch-time and pretrained value; the selected trained."""
    final = snapshot(trainer.model)
    training = {n for g in trainer.active_groups for n in trainer.parameter_groups[g]}
    for name, value in final.items():
        if name not in training:
            assert torch.equal(value, at_switch[name]), f"{name} moved after the switch"
            assert torch.equal(value, pretrained[name]), f"{name} is not pretrained"
    for name in trainer.bias_layout.names(trainer.active_groups):
        assert not torch.equal(final[name], at_switch[name]), f"selected {name} did not train"
