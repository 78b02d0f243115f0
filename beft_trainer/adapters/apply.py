"""Applying adapters to a base model: checked against it, several side by side, switched exactly."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable

import torch
from torch import nn

from ..biases import model_type_of
from ..errors import AdapterError
from ..vectors import prepare_model
from .arithmetic import apply_delta
from .fingerprint import base_model_fingerprint, combine_digests, parameter_digests
from .format import ADAPTER_TYPES, BeftAdapter, read_adapter, require_argument_types
from .metadata import AdapterMetadata

__all__ = ["AdapterSet", "check_adapter", "load_adapter", "prepare_base_model"]


class AdapterSet:
    """Several adapters on one base model, switched exactly.

    The base values of every parameter an adapter touches are kept (a few KB), so switching
    restores them before applying the next adapter: ``set_adapter(name)`` gives the same
    parameters as applying that adapter to a fresh base model, and ``set_adapter(None)`` the
    base model itself. Every adapter is checked against the base model when added; the base
    model is hashed once per set (per-parameter digests are kept), not once per adapter, so the
    base must not be changed by other means while the set lives.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.adapters: dict[str, BeftAdapter] = {}
        self.active_adapter: str | None = None
        self._base: dict[str, torch.Tensor] = {}
        self._digests: dict[str, bytes] = {}

    def add(self, adapter: BeftAdapter | str | os.PathLike, adapter_name: str = "default") -> BeftAdapter:
        """Check ``adapter`` (or the folder it is in) against the base model and keep it under ``adapter_name``."""
        _refuse_mixed_batches(self.model)
        if not isinstance(adapter, BeftAdapter):
            adapter = read_adapter(adapter)
        if adapter_name in self.adapters:
            raise AdapterError(f"An adapter named {adapter_name!r} is already loaded; pick another name.")
        prepare_base_model(self.model, adapter.metadata)
        check_prepared(self.model, adapter, self.base_fingerprint(exclude=adapter.head))
        params = dict(self.model.named_parameters())
        for name in [*adapter.bias_names, *adapter.head]:
            if name not in self._base:
                self._base[name] = params[name].detach().clone()
        self.adapters[adapter_name] = adapter
        return adapter

    def base_fingerprint(self, exclude: Iterable[str] = ()) -> str:
        """``base_model_fingerprint`` of the base model, from digests kept since the first call.

        Parameters an adapter has changed are hashed at their kept base values.
        """
        digests = parameter_digests(self.model, exclude, self._base, known=self._digests)
        self._digests |= digests
        return combine_digests(digests)

    def set_adapter(self, adapter_name: str | None) -> None:
        """Make ``adapter_name`` the active adapter; ``None`` restores the base model."""
        if adapter_name is not None and adapter_name not in self.adapters:
            raise AdapterError(f"No adapter named {adapter_name!r}; loaded: {', '.join(self.adapters) or 'none'}.")
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, base in self._base.items():
                params[name].copy_(base)
            if adapter_name is not None:
                adapter = self.adapters[adapter_name]
                for name, delta in adapter.deltas.items():
                    param = params[name]
                    param.copy_(apply_delta(self._base[name], delta, param.dtype, adapter.fixes.get(name)))
                for name, value in adapter.head.items():
                    params[name].copy_(value.to(params[name].device, params[name].dtype))
        self.active_adapter = adapter_name

    def remove(self, adapter_name: str) -> None:
        """Forget an adapter (the base model comes back if it was active)."""
        if adapter_name not in self.adapters:
            raise AdapterError(f"No adapter named {adapter_name!r}; loaded: {', '.join(self.adapters) or 'none'}.")
        if self.active_adapter == adapter_name:
            self.set_adapter(None)
        del self.adapters[adapter_name]


def _refuse_mixed_batches(model: nn.Module) -> None:
    """Refuse a model that serves mixed batches: their rows share its weights, which an applied adapter changes."""
    mixed = getattr(model, "beft_mixed_adapters", None)
    if mixed is not None:
        raise AdapterError(
            f"This model serves mixed batches (load_mixed_adapters: {', '.join(mixed.adapters) or 'no adapters'}): "
            "an adapter applied to its weights would change the base every row shares (rows with None would no "
            "longer be the base model). Call model.beft_mixed_adapters.unload() first, or use another base model."
        )


def prepare_base_model(model: nn.Module, metadata: AdapterMetadata) -> None:
    """Give a freshly loaded base model the parameter layout the trainer gave it.

    ``BeftTrainer`` splits GPT-2's fused q/k/v bias into three parameters, may add zero
    q/k/v biases to a bias-free model and attaches scaling vectors (ones); the same steps make
    the adapter's names (and the base fingerprint) match (``beft_trainer.vectors.prepare_model``).
    A no-op on a model already prepared, and on a model of another architecture.
    """
    if model_type_of(model) != metadata.model_type:
        return  # check_adapter says why
    prepare_model(model, metadata.added_biases, metadata.scaling_types)


def check_adapter(
    model: nn.Module, adapter: BeftAdapter, base_fingerprint: str | None = None, *, any_num_labels: bool = False
) -> None:
    """Raise ``AdapterError`` unless ``adapter`` was trained from ``model``.

    Checks the architecture, the parameter names and shapes, then the fingerprint of every
    parameter but the head (``base_fingerprint`` if given, else computed from ``model``): any
    weight that differs from the adapter's base model is refused. With ``any_num_labels`` a head
    parameter may differ from the model's in its label dimension (dim 0 of size
    ``config.num_labels``): mixed batches run each task's head with its own label count.

    ``model`` may be freshly loaded: it is checked in the layout ``load_adapter`` gives it
    (``prepare_base_model``), on a copy of its module tree that shares its weights, so ``model``
    itself is left as it is.
    """
    require_argument_types(
        "check_adapter(model, adapter)",
        "the base model (a torch.nn.Module), then a BeftAdapter (read_adapter(folder))",
        (model, nn.Module),
        (adapter, BeftAdapter),
    )
    check_prepared(_prepared_view(model, adapter.metadata), adapter, base_fingerprint, any_num_labels=any_num_labels)


def check_prepared(
    model: nn.Module, adapter: BeftAdapter, base_fingerprint: str | None = None, *, any_num_labels: bool = False
) -> None:
    """``check_adapter`` on a model ``prepare_base_model`` has prepared already (so nothing is prepared twice)."""
    metadata = adapter.metadata
    params = dict(model.named_parameters())
    model_type = model_type_of(model)
    if model_type != metadata.model_type:
        raise AdapterError(
            f"This adapter was trained on a {metadata.model_type!r} model "
            f"({metadata.base_model or 'base model unnamed'}); the model given is {model_type!r}."
        )
    where = f"the adapter for {metadata.base_model or 'an unnamed base model'}"
    missing = [n for n in [*adapter.bias_names, *adapter.head] if n not in params]
    if missing:
        raise AdapterError(
            f"The {type(model).__name__} has no parameters {missing[:5]} that {where} changes; "
            f"it was saved from a {metadata.model_class or metadata.model_type}."
        )
    for kind, tensors in (("bias", adapter.deltas), ("head", adapter.head)):
        for name, tensor in tensors.items():
            if tuple(params[name].shape) != tuple(tensor.shape) and not (
                any_num_labels and kind == "head" and _differs_in_labels(model, params[name], tensor)
            ):
                hint = f" (load the base model with num_labels={metadata.num_labels})" if kind == "head" else ""
                raise AdapterError(
                    f"Shape mismatch for {kind} parameter {name}: {where} has {tuple(tensor.shape)}, "
                    f"the model has {tuple(params[name].shape)}{hint}."
                )
    found = base_fingerprint or base_model_fingerprint(model, exclude=adapter.head)
    if found != metadata.fingerprint:
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params.values()})
        raise AdapterError(
            f"This model is not the base model of {where}: some of its weights differ from those the "
            f"adapter was trained on (fingerprint {found[:12]} != {metadata.fingerprint[:12]}). Load the exact "
            f"base checkpoint, in the dtype it was trained from (float32 unless you loaded it otherwise; "
            f"this model holds {', '.join(dtypes)})."
        )


def _prepared_view(model: nn.Module, metadata: AdapterMetadata) -> nn.Module:
    """``model`` as ``prepare_base_model`` would leave it, ``model`` itself unchanged.

    Preparing renames, adds and attaches parameters (GPT-2's split q/k/v bias, added biases,
    scaling vectors): a check must not do that to the user's model, so it prepares a copy of the
    module tree whose modules hold the same weight tensors (only the few vectors it creates are new).
    """
    copies: dict[int, nn.Module] = {}

    def copy_module(module: nn.Module) -> nn.Module:
        if id(module) not in copies:  # a module reachable twice stays one module
            clone = copies[id(module)] = copy.copy(module)
            # A shallow copy shares the registries (parameters, submodules, hooks): preparing would edit the original's.
            for key, value in vars(module).items():
                if isinstance(value, (dict, set)):
                    vars(clone)[key] = copy.copy(value)
            for key, child in module._modules.items():
                clone._modules[key] = None if child is None else copy_module(child)
        return copies[id(module)]

    view = copy_module(model)
    prepare_base_model(view, metadata)
    return view


def _differs_in_labels(model: nn.Module, param: torch.Tensor, stored: torch.Tensor) -> bool:
    """Whether two head shapes differ only in the label dimension (dim 0 of size ``config.num_labels``)."""
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    return (
        param.dim() == stored.dim() >= 1
        and param.shape[0] == num_labels
        and tuple(param.shape[1:]) == tuple(stored.shape[1:])
    )


def load_adapter(
    model: nn.Module, path: str | os.PathLike | BeftAdapter, adapter_name: str = "default", activate: bool = True
) -> AdapterSet:
    """Apply a BEFT adapter to a freshly loaded base ``model`` (in place) and return its ``AdapterSet``.

    Calling it again on the same model adds another adapter to the same set (and, with
    ``activate``, switches to it); ``AdapterSet.set_adapter(name)`` switches between them.
    Raises ``AdapterError`` if the adapter is damaged or the model is not its base model
    (architecture, shapes, or any weight outside the head), and a model serving mixed batches.
    """
    require_argument_types(
        "load_adapter(model, path)",
        "the base model (a torch.nn.Module), then a BeftAdapter or its folder",
        (model, nn.Module),
        (path, ADAPTER_TYPES),
    )
    adapter_set = getattr(model, "beft_adapters", None)
    if not isinstance(adapter_set, AdapterSet):
        adapter_set = AdapterSet(model)
    adapter_set.add(path, adapter_name)
    # A plain attribute (not a submodule): the set holds tensors, not parameters.
    object.__setattr__(model, "beft_adapters", adapter_set)
    if activate:
        adapter_set.set_adapter(adapter_name)
    return adapter_set
