"""BEFT adapters: the trained bias deltas and the task head, saved as safetensors + JSON.

A BEFT run changes a few thousand scalars of a model; this module stores exactly those, so a
task costs kilobytes instead of a model copy:

- ``adapter.safetensors``: ``bias/<name>`` = trained - pretrained value of every bias the run
  changed, ``head/<name>`` = the trained head parameters in full, and ``fix/<name>/index`` +
  ``fix/<name>/value``: the few elements where ``pretrained + delta`` rounds away from the
  trained value (a bias crossing zero), stored as trained values so loading is exact.
- ``beft_adapter.json``: selected types, score, base model, ``model_type``, a SHA-256 fingerprint
  of the pretrained biases it touches (values and shapes), of a sample of their layers' weights
  and of the head shapes, library version,
  parameter count and file size.

``load_adapter`` applies an adapter to a freshly loaded base model and reproduces the trained
model's outputs bit for bit; a different base model, architecture or shape is refused. Several
adapters live side by side on one base model in an ``AdapterSet`` and switch exactly.
Only JSON and safetensors are read: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .biases import add_missing_biases, model_type_of, split_fused_qkv_bias
from .distributed import read_full_fp32, settle_zero3
from .errors import BeftConfigError

logger = logging.getLogger(__name__)

#: File names of an adapter inside its folder.
ADAPTER_WEIGHTS_NAME = "adapter.safetensors"
ADAPTER_CONFIG_NAME = "beft_adapter.json"
#: Version of the on-disk layout; bumped on incompatible changes.
ADAPTER_FORMAT_VERSION = 1

_BIAS_PREFIX = "bias/"
_HEAD_PREFIX = "head/"
_FIX_PREFIX = "fix/"
#: Leading elements of each touched layer's weight that go into the fingerprint.
_WEIGHT_SAMPLE = 32
_HEAD_GROUPS = ("head", "head_decay")
_SPLIT_SUFFIXES = (".bias_q", ".bias_k", ".bias_v")


class AdapterError(BeftConfigError):
    """An adapter that cannot be read, or that does not fit the model it is applied to."""


@dataclass
class AdapterMetadata:
    """The ``beft_adapter.json`` of an adapter."""

    model_type: str
    fingerprint: str
    bias_groups: dict[str, list[str]]
    head: list[str]
    selected: list[str] = field(default_factory=list)
    score: str | None = None
    base_model: str | None = None
    model_class: str | None = None
    backbone_prefix: str | None = None
    num_labels: int | None = None
    added_biases: bool = False
    parameter_count: int = 0
    file_size: int = 0
    library_version: str = ""
    format_version: int = ADAPTER_FORMAT_VERSION

    @property
    def bias_types(self) -> list[str]:
        """Bias groups stored (types such as ``v``, or ``other_biases`` for BitFit)."""
        return list(self.bias_groups)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready metadata."""
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> AdapterMetadata:
        """Inverse of ``to_dict``; refuses unknown format versions."""
        version = payload.get("format_version")
        if version != ADAPTER_FORMAT_VERSION:
            raise AdapterError(
                f"Adapter format version {version!r} is not supported by this beft_trainer "
                f"(reads version {ADAPTER_FORMAT_VERSION}); upgrade beft-trainer."
            )
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in payload.items() if k in known})


@dataclass
class BeftAdapter:
    """An adapter in memory: bias deltas, head values and their metadata."""

    deltas: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]
    metadata: AdapterMetadata
    #: name -> (flat indices, trained values) where ``pretrained + delta`` rounds off the trained value.
    fixes: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def bias_names(self) -> list[str]:
        """Every bias the adapter changes."""
        return list(self.deltas)

    @property
    def parameter_count(self) -> int:
        """Number of scalars stored."""
        return sum(t.numel() for part in (self.deltas, self.head) for t in part.values())

    def save(self, output_dir: str | os.PathLike) -> str:
        """Write ``adapter.safetensors`` and ``beft_adapter.json`` to ``output_dir``; returns the folder."""
        output_dir = os.fspath(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        tensors = {_BIAS_PREFIX + n: t.detach().cpu().contiguous() for n, t in self.deltas.items()}
        for name, (index, value) in self.fixes.items():
            tensors[f"{_FIX_PREFIX}{name}/index"] = index.to(torch.int32).contiguous()
            tensors[f"{_FIX_PREFIX}{name}/value"] = value.detach().cpu().contiguous()
        tensors |= {_HEAD_PREFIX + n: t.detach().cpu().contiguous() for n, t in self.head.items()}
        weights = os.path.join(output_dir, ADAPTER_WEIGHTS_NAME)
        save_file(tensors, weights, metadata={"format": "pt", "fingerprint": self.metadata.fingerprint})
        self.metadata.parameter_count = self.parameter_count
        self.metadata.file_size = os.path.getsize(weights)
        with open(os.path.join(output_dir, ADAPTER_CONFIG_NAME), "w") as f:
            json.dump(self.metadata.to_dict(), f, indent=2)
        logger.info(
            "Saved BEFT adapter (%s, %d parameters, %s) to %s",
            "+".join(self.metadata.bias_types) or "head only",
            self.metadata.parameter_count,
            format_size(self.metadata.file_size),
            output_dir,
        )
        return output_dir


# -- fingerprint and exact deltas -------------------------------------------------------------


def adapter_fingerprint(
    pretrained: Mapping[str, torch.Tensor],
    head_shapes: Mapping[str, Iterable[int]] | None = None,
    weight_samples: Mapping[str, torch.Tensor] | None = None,
) -> str:
    """SHA-256 of the pretrained bias values and shapes (by name), weight samples and head shapes.

    Bias values are hashed as fp32, so a base model loaded in another dtype does not match: its
    outputs could not be reproduced exactly either. ``weight_samples`` (see ``weight_samples``)
    tell apart base models that share biases but not weights.
    """
    digest = hashlib.sha256(b"beft-adapter-fingerprint-v1\0")
    for name in sorted(pretrained):
        value = pretrained[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"bias:{name}:{tuple(value.shape)}\0".encode())
        digest.update(value.numpy().tobytes())
    for name in sorted(weight_samples or {}):
        digest.update(f"weight:{name}\0".encode())
        digest.update(weight_samples[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    for name in sorted(head_shapes or {}):
        digest.update(f"head:{name}:{tuple(int(d) for d in head_shapes[name])}\0".encode())
    return digest.hexdigest()


def weight_samples(
    model: nn.Module, bias_names: Iterable[str], exclude: Iterable[str] = ()
) -> dict[str, torch.Tensor]:
    """The leading elements of the weight of each layer whose bias is named, rounded to bfloat16.

    Frozen weights never change in training, so these identify the base model cheaply (hashing
    every weight would cost seconds on large models). The bfloat16 rounding makes a run with
    ``frozen_dtype="bfloat16"`` agree with its float32 base checkpoint.
    """
    params = dict(model.named_parameters())
    exclude = set(exclude)  # trained head weights are not the base model's
    samples = {}
    for name in bias_names:
        weight = name.rsplit(".", 1)[0] + ".weight"
        if weight in params and weight not in samples and weight not in exclude:
            # A view of the first elements: no copy of the whole matrix (except under ZeRO-3).
            flat = params[weight].detach().reshape(-1) if params[weight].numel() else params[weight].detach()
            if hasattr(params[weight], "ds_id"):
                flat = read_full_fp32(params[weight]).reshape(-1)
            samples[weight] = flat[:_WEIGHT_SAMPLE].to("cpu", torch.bfloat16).float()
    return samples


def apply_delta(
    pretrained: torch.Tensor,
    delta: torch.Tensor,
    dtype: torch.dtype | None = None,
    fix: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``pretrained + delta`` in the delta's precision, cast to ``dtype``, with the fixed elements set."""
    value = (pretrained.to(delta.dtype) + delta.to(pretrained.device)).to(dtype or pretrained.dtype)
    if fix is not None and fix[0].numel():
        index, fixed = fix
        value = value.flatten().index_copy(0, index.long().to(value.device), fixed.to(value)).view_as(value)
    return value


def exact_delta(
    pretrained: torch.Tensor, trained: torch.Tensor
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """A delta (in ``trained``'s dtype) and the fix that make ``apply_delta`` give ``trained`` bit for bit.

    ``trained - pretrained`` rounds, and adding it back can land one ulp away from ``trained``;
    such elements are nudged by one ulp. Where the delta's ulp is coarser than the result's (a
    bias crossing zero) no delta of that dtype adds back exactly: those few elements are the fix,
    ``(flat indices, trained values)``, or ``None`` when there are none.
    """
    pretrained, trained = pretrained.detach().cpu(), trained.detach().cpu()
    dtype = trained.dtype
    delta = trained - pretrained.to(dtype)
    if dtype in (torch.float32, torch.float64):
        for _ in range(2):
            landed = apply_delta(pretrained, delta, dtype)
            wrong = landed != trained
            if not wrong.any():
                return delta, None
            towards = torch.where(landed < trained, torch.inf, -torch.inf).to(dtype)
            delta = torch.where(wrong, torch.nextafter(delta, towards), delta)
    index = (apply_delta(pretrained, delta, dtype) != trained).flatten().nonzero().flatten()
    if not index.numel():
        return delta, None
    return delta, (index.to(torch.int32), trained.flatten()[index].clone())


# -- building an adapter ----------------------------------------------------------------------


def build_adapter(
    model: nn.Module,
    bias_groups: Mapping[str, Iterable[str]],
    pretrained: Mapping[str, torch.Tensor],
    head: Iterable[str] = (),
    *,
    selected: Iterable[str] | None = None,
    score: str | None = None,
    added_biases: bool = False,
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
    """
    from . import __version__

    params = dict(model.named_parameters())
    groups = {group: list(names) for group, names in bias_groups.items()}
    head = list(head)
    missing = [n for n in [*(n for names in groups.values() for n in names), *head] if n not in params]
    if missing:
        raise AdapterError(f"{type(model).__name__} has no parameters {missing[:5]}.")
    no_pretrained = [n for names in groups.values() for n in names if n not in pretrained]
    if no_pretrained:
        raise AdapterError(f"No pretrained value given for {no_pretrained[:5]}.")
    deltas, fixes = {}, {}
    for names in groups.values():
        for name in names:
            trained = read_full_fp32(params[name]).to(_full_dtype(params[name]))
            deltas[name], fix = exact_delta(pretrained[name].to(trained.dtype), trained)
            if fix is not None:
                fixes[name] = fix
    head_values = {name: read_full_fp32(params[name]).to(_full_dtype(params[name])) for name in head}
    touched = {name: pretrained[name] for names in groups.values() for name in names}
    metadata = AdapterMetadata(
        model_type=model_type_of(model),
        fingerprint=adapter_fingerprint(
            touched, {n: v.shape for n, v in head_values.items()}, weight_samples(model, touched, head)
        ),
        bias_groups=groups,
        head=head,
        selected=list(selected) if selected is not None else list(groups),
        score=score,
        base_model=getattr(getattr(model, "config", None), "name_or_path", None) or None,
        model_class=type(model).__name__,
        backbone_prefix=getattr(model, "base_model_prefix", None) or None,
        num_labels=getattr(getattr(model, "config", None), "num_labels", None),
        added_biases=added_biases,
        library_version=__version__,
    )
    adapter = BeftAdapter(deltas=deltas, head=head_values, metadata=metadata, fixes=fixes)
    metadata.parameter_count = adapter.parameter_count
    return adapter


def adapter_from_trainer(trainer: Any) -> BeftAdapter:
    """The adapter of a ``BeftTrainer``: its active bias groups, any frozen group that moved, the head.

    A frozen group moved when the selection ran with ``rewind=False``: its probing changes stay
    in the model, so they are stored too, or the adapter would not reproduce the model.
    """
    settle_zero3(trainer.model_wrapped)
    head_groups = [g for g in _HEAD_GROUPS if g in trainer.parameter_groups]
    # BeftTrainer keeps head biases (classifier, pooler) out of BitFit's bias groups: no overlap here.
    head = [n for g in head_groups for n in trainer.parameter_groups[g]]
    params = dict(trainer.model.named_parameters())
    groups: dict[str, list[str]] = {}
    for group, names in trainer.parameter_groups.items():
        if group in head_groups:
            continue
        if group in trainer.active_groups or _moved(params, names, trainer.pretrained_biases):
            groups[group] = names
    selection = _selection_callback(trainer)
    selected = [g for g in trainer.active_groups if g not in head_groups]
    return build_adapter(
        trainer.model,
        groups,
        trainer.pretrained_biases,
        head=head,
        selected=selected,
        score=getattr(selection, "score", None) if selection is not None else None,
        added_biases=bool(getattr(trainer.beft_config, "add_missing_biases", False)),
    )


def save_adapter(trainer: Any, output_dir: str | os.PathLike | None = None) -> AdapterMetadata:
    """Save the adapter of a ``BeftTrainer`` to ``output_dir`` (default ``args.output_dir``).

    Call it on every process (under ZeRO-3 reading the parameters is collective); only the
    main process writes. Returns the metadata, with the file size of ``adapter.safetensors``.
    """
    adapter = adapter_from_trainer(trainer)
    if trainer.is_world_process_zero():
        adapter.save(output_dir or trainer.args.output_dir)
    return adapter.metadata


def save_bias_adapter(
    model: nn.Module,
    output_dir: str | os.PathLike,
    bias_groups: Mapping[str, Iterable[str]],
    pretrained: Mapping[str, torch.Tensor],
    head: Iterable[str] = (),
    **metadata: Any,
) -> AdapterMetadata:
    """Lower-level ``save_adapter``: build the adapter of ``model`` (see ``build_adapter``) and save it."""
    adapter = build_adapter(model, bias_groups, pretrained, head, **metadata)
    adapter.save(output_dir)
    return adapter.metadata


# -- reading ----------------------------------------------------------------------------------


def read_adapter(path: str | os.PathLike) -> BeftAdapter:
    """Read an adapter folder (JSON and safetensors only) and check it is complete."""
    path = os.fspath(path)
    config_path = os.path.join(path, ADAPTER_CONFIG_NAME)
    weights_path = os.path.join(path, ADAPTER_WEIGHTS_NAME)
    if not os.path.isdir(path):
        raise AdapterError(f"{path!r} is not a folder; pass the folder that holds {ADAPTER_CONFIG_NAME}.")
    if not (os.path.isfile(config_path) and os.path.isfile(weights_path)):
        raise AdapterError(
            f"No BEFT adapter in {path!r}: expected {ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME} "
            "(written by BeftTrainer.save_model() or beft_trainer.save_adapter())."
        )
    try:
        with open(config_path) as f:
            metadata = AdapterMetadata.from_dict(json.load(f))
    except (json.JSONDecodeError, TypeError) as error:
        raise AdapterError(f"{config_path} is not a valid BEFT adapter config: {error}") from error
    tensors = load_file(weights_path)
    deltas = {k[len(_BIAS_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_BIAS_PREFIX)}
    head = {k[len(_HEAD_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_HEAD_PREFIX)}
    fixes = {
        k[len(_FIX_PREFIX) : -len("/index")]: (v, tensors.get(k.removesuffix("index") + "value"))
        for k, v in tensors.items()
        if k.startswith(_FIX_PREFIX) and k.endswith("/index")
    }
    expected = {n for names in metadata.bias_groups.values() for n in names}
    broken_fix = [n for n, fix in fixes.items() if n not in deltas or not _valid_fix(fix, deltas[n])]
    if set(deltas) != expected or set(head) != set(metadata.head) or broken_fix:
        raise AdapterError(
            f"{weights_path} does not hold the tensors {config_path} lists; the folder mixes two adapters."
        )
    return BeftAdapter(deltas=deltas, head=head, metadata=metadata, fixes=fixes)


# -- applying ---------------------------------------------------------------------------------


class AdapterSet:
    """Several adapters on one base model, switched exactly.

    The base values of every parameter an adapter touches are kept (a few KB), so switching
    restores them before applying the next adapter: ``set_adapter(name)`` gives the same
    parameters as applying that adapter to a fresh base model, and ``set_adapter(None)`` the
    base model itself. Every adapter is checked against the base values when added.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.adapters: dict[str, BeftAdapter] = {}
        self.active_adapter: str | None = None
        self._base: dict[str, torch.Tensor] = {}

    def add(self, adapter: BeftAdapter | str | os.PathLike, adapter_name: str = "default") -> BeftAdapter:
        """Check ``adapter`` (or the folder it is in) against the base model and keep it under ``adapter_name``."""
        if not isinstance(adapter, BeftAdapter):
            adapter = read_adapter(adapter)
        if adapter_name in self.adapters:
            raise AdapterError(f"An adapter named {adapter_name!r} is already loaded; pick another name.")
        prepare_base_model(self.model, adapter.metadata)
        check_adapter(self.model, adapter, self._base)
        params = dict(self.model.named_parameters())
        for name in [*adapter.bias_names, *adapter.head]:
            if name not in self._base:
                self._base[name] = params[name].detach().clone()
        self.adapters[adapter_name] = adapter
        return adapter

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


def prepare_base_model(model: nn.Module, metadata: AdapterMetadata) -> None:
    """Give a freshly loaded base model the parameter layout the trainer gave it.

    ``BeftTrainer`` splits GPT-2's fused q/k/v bias into three parameters and may add zero
    q/k/v biases to a bias-free model; the same steps make the adapter's names match. Both are
    no-ops on a model already prepared, and on a model of another architecture.
    """
    if model_type_of(model) != metadata.model_type:
        return  # check_adapter says why
    names = [n for names in metadata.bias_groups.values() for n in names]
    if any(n.endswith(_SPLIT_SUFFIXES) for n in names):
        split_fused_qkv_bias(model)
    if metadata.added_biases:
        add_missing_biases(model)


def check_adapter(
    model: nn.Module, adapter: BeftAdapter, base_values: Mapping[str, torch.Tensor] | None = None
) -> None:
    """Raise ``AdapterError`` unless ``adapter`` was trained from ``model``.

    Checks the parameter names, their shapes and the fingerprint of the pretrained biases the
    adapter changes (read from ``base_values`` where given, else from the model).
    """
    params = dict(model.named_parameters())
    metadata = adapter.metadata
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
            if tuple(params[name].shape) != tuple(tensor.shape):
                hint = f" (load the base model with num_labels={metadata.num_labels})" if kind == "head" else ""
                raise AdapterError(
                    f"Shape mismatch for {kind} parameter {name}: {where} has {tuple(tensor.shape)}, "
                    f"the model has {tuple(params[name].shape)}{hint}."
                )
    base_values = base_values or {}
    base = {n: base_values.get(n, params[n]) for n in adapter.bias_names}
    found = adapter_fingerprint(
        base,
        {n: t.shape for n, t in adapter.head.items()},
        weight_samples(model, adapter.bias_names, adapter.head),
    )
    if found != metadata.fingerprint:
        dtypes = sorted({str(params[n].dtype) for n in adapter.bias_names})
        raise AdapterError(
            f"This model is not the base model of {where}: its pretrained biases or weights differ "
            f"(fingerprint {found[:12]} != {metadata.fingerprint[:12]}). Load the exact base "
            f"checkpoint in float32 (the adapter's biases are {', '.join(dtypes)} here)."
        )


def load_adapter(
    model: nn.Module, path: str | os.PathLike | BeftAdapter, adapter_name: str = "default", activate: bool = True
) -> AdapterSet:
    """Apply a BEFT adapter to a freshly loaded base ``model`` (in place) and return its ``AdapterSet``.

    Calling it again on the same model adds another adapter to the same set (and, with
    ``activate``, switches to it); ``AdapterSet.set_adapter(name)`` switches between them.
    Raises ``AdapterError`` if the model is not the adapter's base model (architecture, shapes,
    or the fingerprint of the pretrained biases).
    """
    adapter_set = getattr(model, "beft_adapters", None)
    if not isinstance(adapter_set, AdapterSet):
        adapter_set = AdapterSet(model)
    adapter_set.add(path, adapter_name)
    # A plain attribute (not a submodule): the set holds tensors, not parameters.
    object.__setattr__(model, "beft_adapters", adapter_set)
    if activate:
        adapter_set.set_adapter(adapter_name)
    return adapter_set


# -- helpers ----------------------------------------------------------------------------------


def format_size(num_bytes: int) -> str:
    """``12.3 KB`` style size (powers of 1024)."""
    size = float(num_bytes)
    for unit in ("B", "KB", "MB"):
        if size < 1024 or unit == "MB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} MB"


def _valid_fix(fix: tuple[torch.Tensor, torch.Tensor | None], delta: torch.Tensor) -> bool:
    index, value = fix
    if value is None or value.shape != index.shape or index.dim() != 1:
        return False
    return not index.numel() or (int(index.min()) >= 0 and int(index.max()) < delta.numel())


def _full_dtype(param: torch.Tensor) -> torch.dtype:
    # ZeRO keeps fp32 master copies of half-precision working copies: store what trained.
    return torch.float32 if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping") else param.dtype


def _moved(params: Mapping[str, torch.Tensor], names: Iterable[str], pretrained: Mapping[str, torch.Tensor]) -> bool:
    return any(not torch.equal(read_full_fp32(params[n]), pretrained[n].float()) for n in names)


def _selection_callback(trainer: Any) -> Any:
    from .callback import BiasSelectionCallback

    handler = getattr(trainer, "callback_handler", None)
    for callback in getattr(handler, "callbacks", []):
        if isinstance(callback, BiasSelectionCallback):
            return callback
    return None
