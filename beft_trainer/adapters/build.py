"""Building the adapter of a trained model: exact deltas of the trained biases, the head in full."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..biases import model_type_of
from ..distributed import is_zero_partitioned, master_dtype, read_full_fp32
from ..errors import AdapterError
from .arithmetic import exact_delta
from .fingerprint import base_model_fingerprint
from .format import BeftAdapter
from .integrity import dtype_name
from .metadata import AdapterMetadata

__all__ = ["build_adapter", "groups_to_store"]


def build_adapter(
    model: nn.Module,
    bias_groups: Mapping[str, Iterable[str]],
    pretrained: Mapping[str, torch.Tensor],
    head: Iterable[str] = (),
    *,
    selected: Iterable[str] | None = None,
    score: str | None = None,
    added_biases: bool = False,
    scaling_types: Iterable[str] = (),
    base_fingerprint: str | None = None,
) -> BeftAdapter:
    """The adapter of ``model``: deltas of the named biases against ``pretrained``, plus the head.

    Args:
        model: the trained model (plain, or a ZeRO-partitioned one: values are gathered).
        bias_groups: group name (bias type) -> parameter names whose deltas are stored.
        pretrained: parameter name -> pretrained value, for every name in ``bias_groups``.
        head: names of the head parameters, stored in full.
        selected: the types the selection chose (default: every group).
        score: the score that chose them.
        added_biases: whether the q/k/v biases were added to a bias-free model
            (``BeftConfig(add_missing_biases=True)``); loading adds them again.
        scaling_types: the scaling-vector types attached to the model (``v_scale_in``, ...);
            loading attaches them again (as ones) before applying the deltas.
        base_fingerprint: ``base_model_fingerprint`` of the base model, taken before training
            (``BeftTrainer`` takes it before casting frozen weights). Default: computed from
            ``model`` with the ``pretrained`` values, which assumes nothing else has changed
            since the base model was loaded.
    """
    from .. import __version__

    params = dict(model.named_parameters())
    groups = {group: list(names) for group, names in bias_groups.items()}
    head = list(head)
    bias_names = [n for names in groups.values() for n in names]
    _check_names(model, params, bias_names, head, pretrained)
    deltas, fixes = _exact_deltas(params, bias_names, pretrained)
    head_values = {name: _trained_value(params[name]) for name in head}
    config = getattr(model, "config", None)
    metadata = AdapterMetadata(
        model_type=model_type_of(model),
        fingerprint=base_fingerprint or base_model_fingerprint(model, exclude=head, base_values=pretrained),
        bias_groups=groups,
        head=head,
        selected=list(selected) if selected is not None else list(groups),
        score=score,
        base_model=getattr(config, "name_or_path", None) or None,
        model_class=type(model).__name__,
        backbone_prefix=getattr(model, "base_model_prefix", None) or None,
        num_labels=getattr(config, "num_labels", None),
        added_biases=added_biases,
        scaling_types=list(scaling_types),
        dtypes={n: dtype_name(t.dtype) for part in (deltas, head_values) for n, t in part.items()},
        library_version=__version__,
    )
    adapter = BeftAdapter(deltas=deltas, head=head_values, metadata=metadata, fixes=fixes)
    metadata.parameter_count = adapter.parameter_count
    return adapter


def _check_names(
    model: nn.Module, params: Mapping[str, torch.Tensor], bias_names: list[str], head: list[str], pretrained: Mapping
) -> None:
    missing = [n for n in [*bias_names, *head] if n not in params]
    if missing:
        raise AdapterError(f"{type(model).__name__} has no parameters {missing[:5]}.")
    no_pretrained = [n for n in bias_names if n not in pretrained]
    if no_pretrained:
        raise AdapterError(f"No pretrained value given for {no_pretrained[:5]}.")


def _exact_deltas(
    params: Mapping[str, torch.Tensor], names: list[str], pretrained: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    deltas, fixes = {}, {}
    for name in names:
        trained = _trained_value(params[name])
        deltas[name], fix = exact_delta(pretrained[name].to(trained.dtype), trained)
        if fix is not None:
            fixes[name] = fix
    return deltas, fixes


def _trained_value(param: torch.Tensor) -> torch.Tensor:
    """The full trained value in the dtype it trained in.

    ZeRO keeps fp32 master copies of half-precision working copies: that is what trained. A
    float16 value is stored as float32 (exactly): float16 deltas would lose range.
    """
    if is_zero_partitioned(param) or master_dtype(param) != param.dtype:
        return read_full_fp32(param)
    dtype = torch.float32 if param.dtype == torch.float16 else param.dtype
    return param.detach().to("cpu", dtype, copy=True)


def groups_to_store(
    model: nn.Module,
    bias_groups: Mapping[str, list[str]],
    active: Iterable[str],
    pretrained: Mapping[str, torch.Tensor],
) -> dict[str, list[str]]:
    """The groups an adapter must store: those that train, and any frozen one that moved (``rewind=False``)."""
    params, active = dict(model.named_parameters()), set(active)
    return {
        group: names
        for group, names in bias_groups.items()
        if group in active or any(not torch.equal(read_full_fp32(params[n]), pretrained[n]) for n in names)
    }
