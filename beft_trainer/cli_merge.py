"""``beft merge ADAPTER --base-model BASE OUT``: the adapter folded into a plain transformers checkpoint."""

from __future__ import annotations

import argparse
import os

__all__ = ["add_merge_parser"]


def add_merge_parser(commands) -> None:
    """Add the ``merge`` subcommand to the ``beft`` command's subparsers."""
    merge = commands.add_parser(
        "merge", help="fold a BEFT adapter into its base model: a plain transformers checkpoint"
    )
    merge.add_argument("adapter_dir", help="folder with beft_adapter.json and adapter.safetensors")
    merge.add_argument("out_dir", help="folder to write config.json + model.safetensors to (new or empty)")
    merge.add_argument("--base-model", required=True, help="the adapter's base model: a local folder or an alias")
    merge.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty OUT_DIR (default: refuse); one holding a peft adapter is refused",
    )
    merge.set_defaults(func=_merge)


def _merge(args: argparse.Namespace) -> int:
    from .adapters import read_adapter, save_merged
    from .adapters.peft import check_out_dir
    from .cli import _export_base_model

    adapter = read_adapter(args.adapter_dir)
    check_out_dir(args.out_dir, args.overwrite, writing="model")  # before loading the base model: refuse early
    model = _export_base_model(args.base_model, adapter.metadata)
    out_dir = save_merged(adapter, model, args.out_dir, overwrite=args.overwrite)
    size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
    print(f"wrote {out_dir} ({size:,} bytes): {type(model).__name__} with the adapter merged")
    print(f"load it with: {type(model).__name__}.from_pretrained({out_dir!r})")
    return 0
