"""What a recipe's command line says beyond its values: which options were given, help that matches
what the recipes accept, and the checks that need the command line's own words (flags, not Python).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

from ..biases import VECTOR_TYPES
from ..checks import check_output_dir
from ..errors import BeftConfigError
from ..option_values import parse_type_list

_BIAS_TYPES_HELP = (
    "Refused by the recipes: --method alone says what trains (e.g. --method q,v, or --method bitfit for every bias)."
)


def given_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> dict[str, Any]:
    """``{dest: raw value}`` of the options ``argv`` gives, whatever their value (defaults left out)."""
    # argparse fills in a default only where the namespace lacks the attribute, so a marker
    # still in place after parsing is an option the command line did not give.
    unset = object()
    namespace = argparse.Namespace(**{action.dest: unset for action in parser._actions})
    parser.parse_known_args(list(argv), namespace=namespace)
    return {dest: value for dest, value in vars(namespace).items() if value is not unset}


def describe_recipe_flags(parser: argparse.ArgumentParser) -> None:
    """``--help`` as the recipes take it: ``--bias_types`` is refused, a ``--no_X`` flag turns ``--X`` off."""
    for action in parser._actions:
        if action.dest == "bias_types":
            action.help = _BIAS_TYPES_HELP
        elif isinstance(action, argparse._StoreFalseAction):
            action.help = f"Turn --{action.dest} off (the same as --{action.dest} false)."
            # The positive flag holds the default; argparse would print this one's False as the default.
            action.default = argparse.SUPPRESS


def check_single_candidate(given: dict[str, Any]) -> None:
    """One ``--candidates`` type: name ``--method`` (the library's message names ``BeftConfig(bias_types=...)``)."""
    try:
        candidates = parse_type_list(given.get("candidates"), "--candidates", VECTOR_TYPES)
    except BeftConfigError:
        return  # the library's message names the unknown or repeated type
    if candidates is not None and len(candidates) == 1:
        raise BeftConfigError(
            f"--candidates {candidates[0]}: BEFT needs at least two candidates to choose from; to train "
            f"{candidates[0]} alone without probing, use --method {candidates[0]} (without --candidates)."
        )


def check_output_folder(output_dir: str, resume_from_checkpoint: str | None) -> None:
    """A folder a new run may write into, for every method (``BeftTrainer`` checks its own only when training starts).

    A resume continues in an earlier run's folder; ``check_output_dir`` counts a recipe's
    ``eval_results.json`` as an earlier run's (``full`` and peft's methods write no other file).
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise BeftConfigError(f"--output_dir {output_dir}: a file, not a folder; choose a new or empty folder.")
    if not resume_from_checkpoint:
        check_output_dir(output_dir)
