"""BEFT adapters: the trained bias deltas and the task head of a run, in kilobytes.

- ``format``: the files (``adapter.safetensors`` + ``beft_adapter.json``), ``BeftAdapter``, ``read_adapter``,
  ``require_argument_types`` (the one check of swapped or mistyped arguments)
- ``metadata``: ``AdapterMetadata``, validated field by field when read
- ``integrity``: the tensors' checksum and the checks of stored dtypes and values
- ``arithmetic``: exact deltas (``pretrained + delta`` is the trained value bit for bit)
- ``fingerprint``: the base model's fingerprint (every parameter but the head)
- ``build``: ``build_adapter`` from a trained model
- ``apply``: ``load_adapter``, ``AdapterSet``, ``check_adapter``
- ``peft``: ``export_peft`` to a peft BEFT adapter folder
- ``mixed``: ``MixedAdapters``, ``load_mixed_adapters``: one batch, one adapter per row
- ``task_layers``: the modules adapters change, answering each row with its task's values
- ``rowwise``: how a stored vector is applied per row (the one place that knows the arithmetic)
- ``merge``: ``merge_adapter``, ``save_merged``: a plain transformers checkpoint with the adapter folded in

See docs/adapters.md and docs/serving.md.
"""

from __future__ import annotations

from ..errors import AdapterError, PeftExportError
from .apply import AdapterSet, check_adapter, load_adapter, prepare_base_model
from .arithmetic import apply_delta, exact_delta
from .build import build_adapter
from .fingerprint import base_model_fingerprint
from .format import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, BeftAdapter, format_size, read_adapter
from .integrity import tensor_checksum
from .merge import merge_adapter, save_merged
from .metadata import ADAPTER_FORMAT_VERSION, AdapterMetadata
from .mixed import BASE_ADAPTER_NAME, MixedAdapters, load_mixed_adapters
from .peft import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, export_peft

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_FORMAT_VERSION",
    "ADAPTER_WEIGHTS_NAME",
    "BASE_ADAPTER_NAME",
    "PEFT_CONFIG_NAME",
    "PEFT_WEIGHTS_NAME",
    "AdapterError",
    "AdapterMetadata",
    "AdapterSet",
    "BeftAdapter",
    "MixedAdapters",
    "PeftExportError",
    "apply_delta",
    "base_model_fingerprint",
    "build_adapter",
    "check_adapter",
    "exact_delta",
    "export_peft",
    "format_size",
    "load_adapter",
    "load_mixed_adapters",
    "merge_adapter",
    "prepare_base_model",
    "read_adapter",
    "save_merged",
    "tensor_checksum",
]
