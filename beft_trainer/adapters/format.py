"""The adapter on disk: ``adapter.safetensors`` + ``beft_adapter.json``, and ``BeftAdapter`` in memory.

- ``adapter.safetensors``: ``bias/<name>`` = trained - pretrained value of every bias the run
  changed, ``head/<name>`` = the trained head parameters in full, and ``fix/<name>/index`` +
  ``fix/<name>/value``: the few elements where ``pretrained + delta`` rounds away from the
  trained value (a bias crossing zero), stored as trained values so loading is exact.
- ``beft_adapter.json``: ``AdapterMetadata`` (selected types, base model fingerprint, the
  checksum of the tensors, their dtypes, ...).

Only JSON and safetensors are read: nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import AdapterError
from .integrity import check_stored_values, dtype_name, tensor_checksum
from .metadata import AdapterMetadata

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_TYPES",
    "ADAPTER_WEIGHTS_NAME",
    "PATH_TYPES",
    "BeftAdapter",
    "format_size",
    "read_adapter",
    "require_argument_types",
]

logger = logging.getLogger(__name__)

#: File names of an adapter inside its folder.
ADAPTER_WEIGHTS_NAME = "adapter.safetensors"
ADAPTER_CONFIG_NAME = "beft_adapter.json"

_BIAS_PREFIX = "bias/"
_HEAD_PREFIX = "head/"
_FIX_PREFIX = "fix/"
_FIX_PARTS = ("index", "value")


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

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of ``adapter.safetensors``, by their stored names."""
        tensors = {_BIAS_PREFIX + n: t.detach().cpu().contiguous() for n, t in self.deltas.items()}
        for name, (index, value) in self.fixes.items():
            tensors[f"{_FIX_PREFIX}{name}/index"] = index.to(torch.int32).contiguous()
            tensors[f"{_FIX_PREFIX}{name}/value"] = value.detach().cpu().contiguous()
        tensors |= {_HEAD_PREFIX + n: t.detach().cpu().contiguous() for n, t in self.head.items()}
        return tensors

    def save(self, output_dir: str | os.PathLike) -> str:
        """Write ``adapter.safetensors`` and ``beft_adapter.json`` to ``output_dir``; returns the folder.

        Records the checksum, dtypes, parameter count and file size in the metadata first.
        """
        output_dir = os.fspath(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        tensors = self.tensors()
        metadata = self.metadata
        metadata.dtypes = {n: dtype_name(t.dtype) for part in (self.deltas, self.head) for n, t in part.items()}
        metadata.checksum = tensor_checksum(tensors)
        metadata.parameter_count = self.parameter_count
        weights = os.path.join(output_dir, ADAPTER_WEIGHTS_NAME)
        save_file(tensors, weights, metadata={"format": "pt", "fingerprint": metadata.fingerprint})
        metadata.file_size = os.path.getsize(weights)
        with open(os.path.join(output_dir, ADAPTER_CONFIG_NAME), "w") as f:
            json.dump(metadata.to_dict(), f, indent=2)
        logger.info(
            "Saved BEFT adapter (%s, %d parameters, %s) to %s",
            "+".join(metadata.bias_types) or "head only",
            metadata.parameter_count,
            format_size(metadata.file_size),
            output_dir,
        )
        return output_dir


#: What a path argument may be.
PATH_TYPES = (str, os.PathLike)
#: What an adapter argument may be: the adapter in memory, or the folder it was saved to.
ADAPTER_TYPES = (BeftAdapter, *PATH_TYPES)


def require_argument_types(call: str, expected: str, *arguments: tuple[object, type | tuple[type, ...]]) -> None:
    """Raise one ``AdapterError`` line unless each ``(value, types)`` pair matches.

    Swapped or mistyped arguments would otherwise fail deep inside (``os.fspath`` of a model, ``.items()``
    of a list) with an error that names neither the call nor the order it expects: ``call`` is the
    signature, ``expected`` says what goes where.
    """
    if all(isinstance(value, types) for value, types in arguments):
        return
    given = ", ".join(type(value).__name__ for value, _ in arguments)
    raise AdapterError(f"{call} takes {expected}; it was given {given}.")


def read_adapter(path: str | os.PathLike) -> BeftAdapter:
    """Read an adapter folder (JSON and safetensors only), refusing anything incomplete or altered.

    Checks, each with its own ``AdapterError``: the metadata's fields, that the file holds exactly
    the tensors the metadata lists, their dtypes and values (``check_stored_values``), and last
    the checksum, which catches any other change to the stored bytes.
    """
    require_argument_types("read_adapter(path)", "the folder of an adapter (a str or os.PathLike)", (path, PATH_TYPES))
    path = os.fspath(path)
    config_path = os.path.join(path, ADAPTER_CONFIG_NAME)
    weights_path = os.path.join(path, ADAPTER_WEIGHTS_NAME)
    if not os.path.isdir(path):
        raise AdapterError(f"{path!r} is not a folder; pass the folder that holds {ADAPTER_CONFIG_NAME}.")
    if not (os.path.isfile(config_path) and os.path.isfile(weights_path)):
        raise AdapterError(
            f"No BEFT adapter in {path!r}: expected {ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME} "
            "(written by BeftTrainer.save_model() or BeftTrainer.save_adapter())."
        )
    try:
        with open(config_path, encoding="utf-8") as f:
            payload = json.load(f)
    except (ValueError, UnicodeDecodeError) as error:
        raise AdapterError(f"{config_path} is not a valid BEFT adapter config: {error}") from error
    metadata = AdapterMetadata.from_dict(payload, source=config_path)
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError) as error:
        raise AdapterError(
            f"{weights_path} is not a readable safetensors file ({error}); it is truncated or damaged: "
            "copy or save the adapter again."
        ) from error
    adapter = _adapter_from_tensors(tensors, metadata, weights_path)
    check_stored_values(adapter, weights_path)
    if tensor_checksum(tensors) != metadata.checksum:
        raise AdapterError(
            f"{weights_path} does not match the checksum in {ADAPTER_CONFIG_NAME}: its bytes changed after it "
            "was saved (a damaged copy or an edit). Copy or save the adapter again."
        )
    return adapter


def _adapter_from_tensors(tensors: dict[str, torch.Tensor], metadata: AdapterMetadata, source: str) -> BeftAdapter:
    """Sort the stored tensors into deltas, head and fixes; refuse any the metadata does not list."""
    deltas, head, fix_parts, unexpected = {}, {}, {}, []
    for key, tensor in tensors.items():
        if key.startswith(_BIAS_PREFIX):
            deltas[key.removeprefix(_BIAS_PREFIX)] = tensor
        elif key.startswith(_HEAD_PREFIX):
            head[key.removeprefix(_HEAD_PREFIX)] = tensor
        elif key.startswith(_FIX_PREFIX) and key.rsplit("/", 1)[-1] in _FIX_PARTS:
            name, part = key.removeprefix(_FIX_PREFIX).rsplit("/", 1)
            fix_parts.setdefault(name, {})[part] = tensor
        else:
            unexpected.append(key)
    expected_biases, expected_head = set(metadata.bias_names), set(metadata.head)
    unexpected += [_BIAS_PREFIX + n for n in deltas if n not in expected_biases]
    unexpected += [_HEAD_PREFIX + n for n in head if n not in expected_head]
    unexpected += [f"{_FIX_PREFIX}{n}/..." for n in fix_parts if n not in expected_biases]
    if unexpected:
        raise AdapterError(
            f"{source} holds tensors {ADAPTER_CONFIG_NAME} does not list: {sorted(unexpected)[:3]}; "
            "the files were edited or come from two different adapters."
        )
    missing = [_BIAS_PREFIX + n for n in metadata.bias_names if n not in deltas]
    missing += [_HEAD_PREFIX + n for n in metadata.head if n not in head]
    missing += [f"{_FIX_PREFIX}{n}/{p}" for n, parts in fix_parts.items() for p in _FIX_PARTS if p not in parts]
    if missing:
        raise AdapterError(
            f"{source} lacks tensors {ADAPTER_CONFIG_NAME} lists: {missing[:3]}; "
            "the files were edited or come from two different adapters."
        )
    fixes = {name: (parts["index"], parts["value"]) for name, parts in fix_parts.items()}
    return BeftAdapter(deltas=deltas, head=head, metadata=metadata, fixes=fixes)


def format_size(num_bytes: int) -> str:
    """``12.3 KB`` style size (powers of 1024)."""
    size = float(num_bytes)
    for unit in ("B", "KB", "MB"):
        if size < 1024 or unit == "MB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} MB"
