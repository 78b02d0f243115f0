"""The recipes' model, tokenizer and config loading: whatever cannot load is one line (exit 2), not a traceback.

A local folder is checked as ``beft`` checks it (``cli.resolve_model``, which also knows the
``minilm`` alias); a name that is no folder is a Hub id. ``run_opt.py`` takes causal decoders only:
an encoder that ``AutoModelForCausalLM`` also loads (BERT as ``BertLMHeadModel``) would see the
gold label word it is scored on, so it is refused from its config, before the weights load, and
every loaded model is checked to be causal on a few tokens.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import AutoConfig
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from ..cli import MODEL_ALIASES, resolve_model
from ..errors import BeftConfigError, CommandError, one_line


class ModelLoadError(BeftConfigError):
    """A model, tokenizer or GGUF file a recipe cannot load, or a model ``run_opt.py`` cannot score."""


def model_source(name: str, option: str = "--model_name_or_path", gguf_file: str | None = None) -> str:
    """The folder or Hub id to load ``name`` from: an alias becomes its folder, a local folder must hold a model."""
    if name.lower() in MODEL_ALIASES or os.path.isdir(name):
        if gguf_file:  # a GGUF folder has no config.json: the file is the model
            if not os.path.isfile(os.path.join(name, gguf_file)):
                raise ModelLoadError(f"--gguf_file {gguf_file}: no such file in {option} {name}.")
            return name
        try:
            return resolve_model(name)
        except CommandError as error:
            raise ModelLoadError(f"{option} {one_line(error)}") from error
    # Hub ids are "name" or "org/name"; anything else that is no folder was meant as a local path.
    if os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"{option} {name}: no such folder (pass a local model folder or a Hub id).")
    return name


def load_pretrained(auto_class: Any, source: str, option: str = "--model_name_or_path", **kwargs: Any) -> Any:
    """``auto_class.from_pretrained(source, **kwargs)``, any failure one ``ModelLoadError`` line."""
    try:
        return auto_class.from_pretrained(source, **kwargs)
    except BeftConfigError:
        raise
    # from_pretrained fails in many ways (offline Hub, no such repo, bad JSON, truncated weights, unknown
    # architecture, a GGUF it cannot read), each its own exception class: all are about the input given.
    except Exception as error:
        offline = " (HF_HUB_OFFLINE is set: only local folders and cached models load)" if _offline() else ""
        raise ModelLoadError(
            f"{option} {source}: cannot load it with {getattr(auto_class, '__name__', auto_class)}{offline}: "
            f"{type(error).__name__}: {one_line(error)}"
        ) from error


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def load_tokenizer(auto_class: Any, tokenizer_name: str | None, model: str, **kwargs: Any) -> Any:
    """The tokenizer of ``--tokenizer_name`` (a folder, alias or Hub id), else the model's."""
    if tokenizer_name is None:
        return load_pretrained(auto_class, model, **kwargs)
    option = "--tokenizer_name"
    is_alias = tokenizer_name.lower() in MODEL_ALIASES
    # A tokenizer folder needs no config.json: only aliases and missing paths are resolved here.
    source = model_source(tokenizer_name, option) if is_alias or not os.path.isdir(tokenizer_name) else tokenizer_name
    return load_pretrained(auto_class, source, option)


def check_causal_config(source: str, **kwargs: Any) -> None:
    """Refuse, from its config alone, a model that is not a causal decoder ``AutoModelForCausalLM`` loads."""
    config = load_pretrained(AutoConfig, source, **kwargs)
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelLoadError(
            f"--model_name_or_path {source}: a {model_type!r} model has no causal LM class in transformers; "
            "run_opt.py needs a causal decoder (OPT, GPT-2, Qwen2, Llama...)."
        )
    # The causal LM class of an encoder with a masked-LM head (BERT, RoBERTa, ELECTRA...) masks causally only
    # with is_decoder set (XLM: causal); an encoder-decoder's causal LM class is its decoder, causal anyway.
    causal_flag = getattr(config, "is_decoder", False) or getattr(config, "causal", False)
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config.is_encoder_decoder and not causal_flag:
        raise ModelLoadError(_not_causal(source, f"a {model_type} encoder (is_decoder is false)"))


def check_causal_model(model: torch.nn.Module, source: str) -> None:
    """Refuse a loaded model whose logits at a position depend on a later token (what the config check misses)."""
    if is_deepspeed_zero3_enabled():  # partitioned weights run only inside the engine; the config check stands
        return
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 8, 10]])
    training = model.training
    model.eval()  # dropout would differ between the two rows
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    model.train(training)
    if not torch.allclose(logits[0, :-1], logits[1, :-1], rtol=1e-3, atol=1e-4):
        raise ModelLoadError(_not_causal(source, f"bidirectional ({type(model).__name__} reads later tokens)"))


def _not_causal(source: str, what: str) -> str:
    return (
        f"--model_name_or_path {source} is {what}, not a causal decoder: scoring a prompt and its label word "
        "in one row would let it see the answer. Use a causal LM here, or recipes/run_glue.py for encoders."
    )
