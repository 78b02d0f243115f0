"""The package's shape: small modules and functions, a documented public API, a light import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import beft_trainer

PACKAGE = Path(beft_trainer.__file__).parent
MAX_MODULE_LINES = 300
MAX_FUNCTION_LINES = 60


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_functions_stay_small(path):
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{path.name} has over {MAX_MODULE_LINES} lines"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{path.name}:{node.lineno} {node.name} has {length} lines"


def test_every_public_name_is_documented():
    for name in beft_trainer.__all__:
        value = getattr(beft_trainer, name)
        if callable(value):
            assert (value.__doc__ or "").strip(), f"beft_trainer.{name} has no docstring"


def test_the_readme_lists_every_public_name():
    readme = (PACKAGE.parent / "README.md").read_text()
    table = readme[readme.index("### Public API") : readme.index("## Recipes, launchers")]
    missing = [name for name in beft_trainer.__all__ if f"`{name}`" not in table]
    assert not missing, f"README's Public API table lacks {missing}"


def test_every_hook_the_callback_overrides_says_what_it_does():
    hooks = [name for name in vars(beft_trainer.BiasSelectionCallback) if name.startswith("on_")]
    assert hooks, "no hook found: the check would compare nothing"
    for name in hooks:
        assert (getattr(beft_trainer.BiasSelectionCallback, name).__doc__ or "").strip(), f"{name} has no docstring"


def _imported_top_level_modules(code: str) -> set[str]:
    script = f"import sys\n{code}\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    return set(output.split())


def test_importing_the_library_adds_nothing_to_what_training_needs():
    training = _imported_top_level_modules(
        "import torch, safetensors.torch, accelerate\nfrom transformers import Trainer, TrainerCallback, HfArgumentParser"
    )
    library = _imported_top_level_modules("import beft_trainer")
    assert library - training == {"beft_trainer"}
