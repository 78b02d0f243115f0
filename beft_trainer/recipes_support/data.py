"""A task's ``train``/``validation`` splits from local files, a data folder or the Hub, checked before any model loads.

Every problem a user can fix (a missing, empty or unreadable file, a missing column, labels that
are not the task's) raises ``DataInputError`` in one line that names the file and the fix, so
the recipes stop before the model loads and before anything is written.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import DataInputError

logger = logging.getLogger(__name__)

#: File extensions read as local data, and the ``datasets`` builder that reads each.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv"}

SPLITS = ("train", "validation")


@dataclass(frozen=True)
class SplitSpec:
    """What every split of a task must hold.

    ``text_columns``: one entry per input field, each a tuple of accepted column names (GLUE and
    SuperGLUE spell RTE's premise differently). ``num_labels``: label ids ``0..num_labels-1``, or
    1 for a regression target (any number).
    """

    task_name: str
    text_columns: tuple[tuple[str, ...], ...]
    num_labels: int


def task_files(
    task_name: str, train_file: str | None, validation_file: str | None, data_dir: str | os.PathLike | None
) -> dict[str, str] | None:
    """``{split: path}`` of the local files to read, or None for the Hub; each file checked to exist and hold data.

    Explicit files (both, without ``data_dir``); else ``data_dir/<task_name>/{train,validation}.jsonl``,
    which must exist when ``data_dir`` is given (no silent fall-back to the Hub).
    """
    check_data_sources(train_file, validation_file, data_dir)
    if train_file or validation_file:
        files = {"train": train_file, "validation": validation_file}
        options = {"train": "--train_file", "validation": "--validation_file"}
    elif data_dir is not None:
        folder = os.path.join(data_dir, task_name)
        files = {split: os.path.join(folder, f"{split}.jsonl") for split in SPLITS}
        options = dict.fromkeys(SPLITS, "--data_dir")
        for path in files.values():
            if not os.path.isfile(path):
                raise DataInputError(
                    f"--data_dir {data_dir}: no {path}; the folder must hold {task_name}/train.jsonl and "
                    f"{task_name}/validation.jsonl (or drop --data_dir to load from the Hub)."
                )
    else:
        return None
    for split, path in files.items():
        check_file(path, options[split])
    return files


def check_data_sources(train_file: str | None, validation_file: str | None, data_dir: object) -> None:
    """Both files or neither, and never files together with ``--data_dir`` (one of them would be ignored)."""
    if bool(train_file) != bool(validation_file):
        raise DataInputError(
            "Pass both --train_file and --validation_file (or neither, to use --data_dir or the Hub)."
        )
    if train_file and data_dir is not None:
        raise DataInputError(
            f"--data_dir {data_dir} with --train_file/--validation_file: the files would be read and the folder "
            "ignored; pass the files or --data_dir, not both."
        )


def check_file(path: str, option: str) -> None:
    """A readable local data file with a known extension and some content."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in FILE_BUILDERS:
        raise DataInputError(
            f"{option} {path}: use a .jsonl, .json, .csv or .tsv file (got {extension or 'no extension'})."
        )
    if not os.path.isfile(path):
        raise DataInputError(f"{option} {path}: no such file.")
    lines = _first_lines(path, 2)
    if not lines:
        raise DataInputError(f"{option} {path}: the file is empty; it needs at least one example.")
    if FILE_BUILDERS[extension] == "csv" and len(lines) < 2:
        raise DataInputError(f"{option} {path}: a header but no rows; the file needs at least one example.")


def _first_lines(path: str, count: int) -> list[str]:
    """Up to ``count`` non-blank lines from the start of a file."""
    lines: list[str] = []
    with open(path, errors="replace") as f:
        for line in f:
            if line.strip():
                lines.append(line)
                if len(lines) == count:
                    break
    return lines


def read_file(path: str):
    """One local file as a ``datasets.Dataset`` (each split separately, so their columns may differ until checked)."""
    from datasets import load_dataset

    extension = os.path.splitext(path)[1].lower()
    options = {"delimiter": "\t"} if extension == ".tsv" else {}
    try:
        with _quiet_progress_bars():  # an error must stay the only line on stderr
            return load_dataset(FILE_BUILDERS[extension], data_files={"train": path}, split="train", **options)
    except Exception as error:  # datasets wraps parse errors in several types (DatasetGenerationError, ArrowInvalid)
        raise DataInputError(
            f"{path}: cannot be read as {FILE_BUILDERS[extension].upper()} ({_root_cause(error)}); "
            "use JSON lines (one object per line) or CSV/TSV with a header row."
        ) from error


@contextlib.contextmanager
def _quiet_progress_bars():
    from datasets.utils import logging as datasets_logging

    was_enabled = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            datasets_logging.enable_progress_bar()


def _root_cause(error: BaseException) -> str:
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def load_hub_splits(hub: Sequence[str], hub_validation_split: str) -> dict:
    """``{"train", "validation"}`` of a Hub dataset; an unreachable Hub is a one-line error that names the way out."""
    from datasets import load_dataset

    try:
        loaded = load_dataset(*hub)
        return {"train": loaded["train"], "validation": loaded[hub_validation_split]}
    except Exception as error:  # offline, unknown name, no network: many exception types
        raise DataInputError(
            f"Could not load {'/'.join(hub)} from the Hub ({type(error).__name__}); "
            "pass --data_dir or --train_file/--validation_file for local data."
        ) from error


def load_splits(
    spec: SplitSpec,
    hub: Sequence[str],
    hub_validation_split: str = "validation",
    train_file: str | None = None,
    validation_file: str | None = None,
    data_dir: str | os.PathLike | None = None,
):
    """A checked ``DatasetDict`` with ``train`` and ``validation`` (sources: see ``task_files``, else the Hub)."""
    from datasets import DatasetDict

    files = task_files(spec.task_name, train_file, validation_file, data_dir)
    if files is None:
        splits = load_hub_splits(hub, hub_validation_split)
        sources = {split: f"{'/'.join(hub)} ({split})" for split in SPLITS}
    else:
        logger.info("Loading %s from %s", spec.task_name, files)
        splits = {split: read_file(path) for split, path in files.items()}
        sources = files
    for split in SPLITS:
        check_split(splits[split], sources[split], spec)
    return DatasetDict(splits)


def check_split(dataset, source: str, spec: SplitSpec) -> None:
    """Rows, the task's columns, text in every row and labels of the task's kind, or one line naming ``source``."""
    if len(dataset) == 0:
        raise DataInputError(f"{source}: no rows; the {spec.task_name} data needs at least one example.")
    columns = dataset.column_names
    missing = [" or ".join(names) for names in spec.text_columns if not set(names) & set(columns)]
    missing += [] if "label" in columns else ["label"]
    if missing:
        raise DataInputError(
            f"{source}: lacks the column(s) {', '.join(missing)} of {spec.task_name} (it has {', '.join(columns)}); "
            "rename them to the Hub's GLUE column names."
        )
    for names in spec.text_columns:
        column = next(name for name in names if name in columns)
        if any(value is None for value in dataset[column]):
            raise DataInputError(f"{source}: some rows have no {column!r}; drop them or fill them in.")
    check_labels(dataset["label"], source, spec)


def check_labels(labels: list, source: str, spec: SplitSpec) -> None:
    """Regression: numbers. Classification: whole numbers 0..num_labels-1 (string labels need mapping first)."""
    if spec.num_labels == 1:
        bad = [x for x in labels if isinstance(x, bool) or not isinstance(x, (int, float))]
        if bad:
            raise DataInputError(f"{source}: {spec.task_name} labels must be numbers, found {bad[0]!r}.")
        return
    expected = f"whole numbers 0..{spec.num_labels - 1}"
    for label in labels:
        if isinstance(label, bool) or not isinstance(label, int):
            raise DataInputError(
                f"{source}: {spec.task_name} labels must be {expected}, found {label!r}; "
                "map label names to ids (e.g. negative=0, positive=1) in the file."
            )
        if not 0 <= label < spec.num_labels:
            raise DataInputError(f"{source}: {spec.task_name} labels must be {expected}, found {label}.")


def sample_examples(dataset, max_samples: int | None, seed: int):
    """A seeded random subset of at most ``max_samples`` rows (the low-data regime); all rows if None."""
    if max_samples is not None and max_samples < 1:
        raise DataInputError(f"max_samples must be >= 1 (or unset for every row), got {max_samples}.")
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(max_samples))
