"""Every error beft_trainer raises, in one place; each message says what to do (``one_line``: on one line)."""

from __future__ import annotations

__all__ = [
    "AdapterError",
    "BeftConfigError",
    "BiasTypeError",
    "CommandError",
    "DataInputError",
    "PeftExportError",
    "ReportError",
    "ResumeError",
    "one_line",
]


class BeftConfigError(ValueError):
    """An invalid configuration of the trainer, the callback or the backend."""


class BiasTypeError(BeftConfigError):
    """A requested bias type does not exist in the model (or the architecture is unknown)."""


class ResumeError(BeftConfigError):
    """A resume whose checkpoint is missing or contradicts the settings of this run."""


class AdapterError(BeftConfigError):
    """An adapter that cannot be read, or that does not fit the model it is applied to."""


class PeftExportError(AdapterError):
    """The adapter holds something peft cannot represent, or the export would overwrite a folder."""


class ReportError(BeftConfigError):
    """A selection report that is missing, malformed or edited, or a plot that cannot be written where asked."""


class DataInputError(BeftConfigError):
    """A recipe's data files are missing, empty or lack the task's columns."""


class CommandError(BeftConfigError):
    """A user error the ``beft`` command reports in one line."""


def one_line(error: BaseException) -> str:
    """``error``'s message on one line: a command prints a single line, whatever the message holds."""
    return " ".join(str(error).split())
