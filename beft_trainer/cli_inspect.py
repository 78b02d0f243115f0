"""``beft inspect MODEL``: every trainable vector type of a model (biases and scaling vectors), its size, the head."""

from __future__ import annotations

import argparse

from torch import nn


def inspect_command(args: argparse.Namespace) -> int:
    """Print the vector types of ``args.model``: kind, vectors, scalars, share, layers, whether selectable."""
    import transformers

    from .biases import SCALING_TYPES
    from .cli import _HEADS, load_model
    from .heads import find_head_parameters
    from .vectors import prepare_model, supported_scaling_types

    transformers.logging.set_verbosity_error()  # "newly initialized head" warnings are expected here
    kwargs = {"num_labels": args.num_labels} if "classification" in args.head else {}
    model = load_model(args.model, _HEADS[args.head], **kwargs)
    total = sum(p.numel() for p in model.parameters())  # before attaching scaling vectors
    layout = prepare_model(model, scaling_types=supported_scaling_types(model))
    params = dict(model.named_parameters())
    print(f"{args.model}: {layout.model_type} ({type(model).__name__}), {total:,} parameters")
    print()
    print(f"{'type':<20}{'kind':<7}{'vectors':>8}{'scalars':>10}{'share':>10}  layers  selectable")
    for vector_type in layout.types:
        vectors = layout.vectors[vector_type]
        scalars = sum(params[v.name].numel() for v in vectors)
        layers = sorted({v.layer for v in vectors})
        kind = "scale" if vector_type in SCALING_TYPES else "bias"
        zero = kind == "bias" and all(not params[v.name].detach().any() for v in vectors)
        note = "yes (all zero: projection score degenerate)" if zero else "yes"
        print(
            f"{vector_type:<20}{kind:<7}{len(vectors):>8}{scalars:>10,}{100 * scalars / total:>9.4f}%  "
            f"{layers[0]}-{layers[-1]:<4}  {note}"
        )
    _print_others(layout, params, set(find_head_parameters(model)))
    _print_head(model, params)
    print(f"candidates for BiasSelectionCallback: {', '.join(layout.types) or 'none'}")
    print("inert types (gradient ~0, e.g. k with absolute positions) are found while probing and excluded.")
    return 0


def _print_others(layout, params: dict[str, nn.Parameter], head: set[str]) -> None:
    others = [n for n in layout.other_biases if n not in head]  # the head's biases train with every method
    if others:
        scalars = sum(params[n].numel() for n in others)
        print(f"{'other':<20}{'bias':<7}{len(others):>8}{scalars:>10,}  trained by BitFit only (not selectable)")
    if not layout.bias_types:
        print("no typed biases: pass BeftConfig(add_missing_biases=True) to add zero-initialised q/k/v biases")
    print()


def _print_head(model: nn.Module, params: dict[str, nn.Parameter]) -> None:
    from .heads import find_head_parameters

    head = find_head_parameters(model)
    print(f"head ({sum(params[n].numel() for n in head):,} parameters, trained in full):")
    for name in head:
        print(f"  {name} {list(params[name].shape)}")
    if not head:
        print("  none detected (name it with BeftConfig(head_modules=...))")
    pooler_bias = f"{getattr(model, 'base_model_prefix', '')}.pooler.dense.bias"
    if pooler_bias in params and pooler_bias not in head:
        print(
            f"  not in it: {pooler_bias} {list(params[pooler_bias].shape)}, the backbone's pooler bias "
            f"(the BEFT/BitFit papers' head trains it: head_modules=[..., {pooler_bias!r}])"
        )
    print()
