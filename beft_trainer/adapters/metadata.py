"""``beft_adapter.json``: what an adapter holds and where it comes from, checked field by field when read."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import AdapterError
from ..json_fields import is_str, is_str_list, is_whole_number, json_kind, map_of, optional, required_fields

__all__ = ["ADAPTER_FORMAT_VERSION", "STORED_DTYPES", "AdapterMetadata"]

#: Version of the on-disk layout; bumped on incompatible changes (2: checksum, whole-model fingerprint).
ADAPTER_FORMAT_VERSION = 2
#: Dtypes a delta or a head value may be stored in (half precision would lose the trained values).
STORED_DTYPES = ("bfloat16", "float32", "float64")

_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class AdapterMetadata:
    """The ``beft_adapter.json`` of an adapter.

    ``fingerprint`` identifies the base model (every parameter but the head, see
    ``base_model_fingerprint``); ``checksum`` the stored tensors (see ``tensor_checksum``);
    ``dtypes`` the dtype of each stored delta and head value, by parameter name.
    """

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
    scaling_types: list[str] = field(default_factory=list)
    dtypes: dict[str, str] = field(default_factory=dict)
    checksum: str = ""
    parameter_count: int = 0
    file_size: int = 0
    library_version: str = ""
    format_version: int = ADAPTER_FORMAT_VERSION

    @property
    def bias_types(self) -> list[str]:
        """Bias groups stored (types such as ``v``, or ``other_biases`` for BitFit)."""
        return list(self.bias_groups)

    @property
    def bias_names(self) -> list[str]:
        """Every bias whose delta the adapter stores."""
        return [name for names in self.bias_groups.values() for name in names]

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready metadata."""
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: Any, source: str = "the adapter config") -> AdapterMetadata:
        """Inverse of ``to_dict``; one ``AdapterError`` naming ``source`` and the field for any wrong input."""
        if not isinstance(payload, Mapping):
            raise AdapterError(f"{source} must hold a JSON object, not {json_kind(payload)}; save the adapter again.")
        _check_version(payload.get("format_version"), source)
        required = required_fields(cls)
        for name, (check, expected) in _FIELD_CHECKS.items():
            if name not in payload:
                if name in required:
                    raise AdapterError(f"{source} lacks the field {name!r}; save the adapter again.")
            elif not check(payload[name]):
                raise AdapterError(
                    f"{source}: field {name!r} must be {expected}, not {json_kind(payload[name])} "
                    f"({payload[name]!r:.60}); the file was edited or is not a BEFT adapter config."
                )
        metadata = cls(**{spec.name: payload[spec.name] for spec in fields(cls) if spec.name in payload})
        metadata.check_names(source)
        return metadata

    def check_names(self, source: str) -> None:
        """Refuse parameter names no model has, names listed twice, and unknown dtypes."""
        names = [*self.bias_names, *self.head]
        for name in names:
            if not _is_parameter_name(name):
                raise AdapterError(f"{source} names a parameter {name!r}, which no model has; the file was edited.")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise AdapterError(f"{source} lists {twice[:3]} more than once; the file was edited.")
        if set(self.dtypes) != set(names):
            odd = sorted(set(self.dtypes) ^ set(names))
            raise AdapterError(f"{source}: field 'dtypes' does not cover exactly the stored parameters ({odd[:3]}).")
        for name, dtype in self.dtypes.items():
            if dtype not in STORED_DTYPES:
                raise AdapterError(
                    f"{source} records {name} as {dtype}; adapters store {', '.join(STORED_DTYPES)} values only."
                )


def _check_version(version: Any, source: str) -> None:
    if version == ADAPTER_FORMAT_VERSION:
        return
    if version == 1:
        raise AdapterError(
            f"{source} is a format-1 adapter, whose fingerprint does not cover the whole base model; "
            "this beft-trainer reads format 2: save the adapter again from the training output."
        )
    raise AdapterError(
        f"Adapter format version {version!r} in {source} is not supported by this beft-trainer "
        f"(reads version {ADAPTER_FORMAT_VERSION}); upgrade beft-trainer."
    )


def _is_parameter_name(name: str) -> bool:
    # Module paths are dot-joined non-empty names: "a..b", ".a" or "a/b" cannot name a parameter.
    return all(part and "/" not in part and part.strip() == part for part in name.split("."))


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


_FIELD_CHECKS = {
    "model_type": (is_str, "a string"),
    "fingerprint": (_is_sha256, "a SHA-256 hex digest"),
    "bias_groups": (map_of(is_str_list), "an object of lists of parameter names"),
    "head": (is_str_list, "a list of parameter names"),
    "selected": (is_str_list, "a list of bias types"),
    "score": (optional(is_str), "a string or null"),
    "base_model": (optional(is_str), "a string or null"),
    "model_class": (optional(is_str), "a string or null"),
    "backbone_prefix": (optional(is_str), "a string or null"),
    "num_labels": (optional(is_whole_number), "a whole number or null"),
    "added_biases": (lambda value: isinstance(value, bool), "true or false"),
    "scaling_types": (is_str_list, "a list of scaling-vector types"),
    "dtypes": (map_of(is_str), "an object of dtype names"),
    "checksum": (_is_sha256, "a SHA-256 hex digest"),
    "parameter_count": (is_whole_number, "a whole number"),
    "file_size": (is_whole_number, "a whole number"),
    "library_version": (is_str, "a string"),
    "format_version": (is_whole_number, "a whole number"),
}
