"""Errors raised by beft_trainer, each telling the user what to do."""

from __future__ import annotations

__all__ = ["BeftConfigError", "BiasTypeError"]


class BeftConfigError(ValueError):
    """An invalid configuration of the trainer, the callback or the backend."""


class BiasTypeError(BeftConfigError):
    """A requested bias type does not exist in the model (or the architecture is unknown)."""
