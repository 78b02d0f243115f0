"""The task head: the freshly initialised parameters that train alongside the biases."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .errors import BeftConfigError

#: Backbone parameters that are part of the head by default, as in the BEFT/BitFit code:
#: BERT's pooler feeds the classifier, and its bias trains with it.
_BACKBONE_HEAD_SUFFIXES = ("pooler.dense.bias",)


def _backbone_prefix(model: nn.Module) -> str | None:
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and hasattr(model, prefix) and getattr(model, prefix) is not model:
        return prefix + "."
    return None


def find_head_parameters(model: nn.Module, head_modules: Sequence[str] | None = None) -> list[str]:
    """Names of the head parameters of ``model``.

    With ``head_modules`` (module names such as ``("classifier",)``), every parameter of those
    modules. Otherwise the parameters outside the backbone (``classifier``, ``score``,
    ``pre_classifier``...) except the output embeddings of a language model, plus the pooler
    bias of BERT-like encoders.
    """
    names = [name for name, _ in model.named_parameters()]
    if head_modules is not None:
        return _parameters_of_modules(model, names, head_modules)
    prefix = _backbone_prefix(model)
    if prefix is None:
        return []
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    lm_head = {id(p) for p in output_embeddings.parameters()} if output_embeddings is not None else set()
    params = dict(model.named_parameters())
    head = [n for n in names if not n.startswith(prefix) and id(params[n]) not in lm_head]
    head += [n for n in names if n.startswith(prefix) and n[len(prefix) :] in _BACKBONE_HEAD_SUFFIXES]
    return head


def _parameters_of_modules(model: nn.Module, names: list[str], head_modules: Sequence[str]) -> list[str]:
    modules = dict(model.named_modules())
    selected: list[str] = []
    for module_name in head_modules:
        if module_name not in modules:
            raise BeftConfigError(
                f"head_modules names {module_name!r}, which is not a module of {type(model).__name__}. "
                f"Top-level modules: {', '.join(n for n, _ in model.named_children())}."
            )
        selected += [n for n in names if n.startswith(module_name + ".")]
    return selected
