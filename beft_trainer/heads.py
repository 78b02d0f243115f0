"""The task head: the freshly initialised parameters that train alongside the biases."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .errors import BeftConfigError


def _backbone_prefix(model: nn.Module) -> str | None:
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and hasattr(model, prefix) and getattr(model, prefix) is not model:
        return prefix + "."
    return None


def find_head_parameters(model: nn.Module, head_modules: Sequence[str] | None = None) -> list[str]:
    """Names of the head parameters of ``model``.

    With ``head_modules``, every parameter of each named module (``"classifier"``) and each named
    parameter (``"bert.pooler.dense.bias"``, the head of the BEFT/BitFit papers' code with
    ``"classifier"``). Otherwise the parameters outside the backbone (``classifier``, ``score``,
    ``pre_classifier``...) except the output embeddings of a language model. BERT's pooler is part
    of the backbone: its bias trains only where a bias type or ``head_modules`` names it (the
    small-budget settings train better without it, see README).
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
    return [n for n in names if not n.startswith(prefix) and id(params[n]) not in lm_head]


def _parameters_of_modules(model: nn.Module, names: list[str], head_modules: Sequence[str]) -> list[str]:
    modules = dict(model.named_modules())
    selected: list[str] = []
    for entry in head_modules:
        if entry in names:
            selected.append(entry)
        elif entry in modules:
            selected += [n for n in names if n.startswith(entry + ".")]
        else:
            raise BeftConfigError(
                f"head_modules names {entry!r}, which is neither a module nor a parameter of "
                f"{type(model).__name__}. Top-level modules: {', '.join(n for n, _ in model.named_children())}."
            )
    return list(dict.fromkeys(selected))
