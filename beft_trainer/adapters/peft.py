"""Export a BEFT adapter as a peft adapter folder (``PeftModel.from_pretrained`` loads it).

Bias deltas go to peft's BEFT tuner (below); scaling vectors to peft's IA3 (``peft_ia3``).

peft's BEFT tuner (``peft.tuners.beft``, peft >= 0.20) wraps ``nn.Linear`` layers and adds a
learned vector ``beft_bias`` to their output: exactly a bias delta. What it can represent:

- bias deltas of linear projections (``q``, ``k``, ``v``, ``attn_out``, ``mlp_in``,
  ``mlp_out``) as ``target_modules``;
- the task head as ``modules_to_save`` (whole top-level modules such as ``classifier``); a head
  bias inside the backbone (BERT's pooler bias) becomes one more BEFT delta on its ``nn.Linear``,
  computed against the base model, which must then be given.

What it cannot: LayerNorm biases (``ln``) and other non-linear biases (BitFit's
``other_biases``), and GPT-2's q/k/v biases, which are slices of a fused ``Conv1D``. Exporting
such an adapter raises ``PeftExportError`` naming them; ``load_adapter`` still loads it.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import PeftExportError
from .apply import check_prepared, prepare_base_model
from .arithmetic import exact_delta
from .format import BeftAdapter, read_adapter
from .peft_ia3 import ia3_targets, write_ia3

__all__ = [
    "PEFT_CONFIG_NAME",
    "PEFT_LINEAR_TYPES",
    "PEFT_WEIGHTS_NAME",
    "check_out_dir",
    "export_peft",
    "peft_unsupported",
]

#: Bias types that live in ``nn.Linear`` layers in every architecture ``find_biases`` knows but GPT-2.
PEFT_LINEAR_TYPES = ("q", "k", "v", "attn_out", "mlp_in", "mlp_out")
#: Architectures whose projections are not ``nn.Linear`` (GPT-2's ``Conv1D``).
_NON_LINEAR_ARCHITECTURES = {
    "gpt2": "GPT-2's projections are Conv1D layers and its q/k/v biases slices of the fused c_attn bias"
}
#: peft task types by the suffix of the model class, so ``from_pretrained`` builds the right wrapper.
_TASK_TYPES = {
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
    "ForCausalLM": "CAUSAL_LM",
    "LMHeadModel": "CAUSAL_LM",
}
_PEFT_PREFIX = "base_model.model."
#: File names of a peft adapter folder.
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
#: Per kind written: the file that makes ``from_pretrained`` read the folder as the other kind, the files
#: of that kind named when refusing, and what loading the folder would then do.
_OTHER_KIND = {
    "peft": (
        "config.json",
        ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"),
        "a transformers model, which from_pretrained(folder) would load with this peft adapter applied on top",
    ),
    "model": (
        PEFT_CONFIG_NAME,
        (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, "adapter_model.bin"),
        "a peft adapter, which from_pretrained(folder) would apply on top of the merged weights",
    ),
}


def peft_unsupported(adapter: BeftAdapter) -> list[str]:
    """Why parts of ``adapter`` cannot be exported to peft (empty if all of it can)."""
    metadata = adapter.metadata
    reasons = []
    if metadata.model_type in _NON_LINEAR_ARCHITECTURES and adapter.bias_names:
        reasons.append(
            f"bias types {', '.join(metadata.bias_types)}: {_NON_LINEAR_ARCHITECTURES[metadata.model_type]}"
        )
        return reasons
    for group, names in metadata.bias_groups.items():
        if group not in PEFT_LINEAR_TYPES:
            kind = "LayerNorm biases" if group == "ln" else "biases outside linear layers"
            reasons.append(f"{group!r} ({len(names)} {kind}, e.g. {names[0]})")
        elif any(not n.endswith(".bias") for n in names):
            reasons.append(f"{group!r} (biases that are not a Linear layer's .bias)")
    if not adapter.bias_names:
        reasons.append("no bias deltas (peft's BEFT tuner needs at least one target module)")
    return reasons


def export_peft(
    source: BeftAdapter | str | os.PathLike,
    out_dir: str | os.PathLike,
    base_model: nn.Module | None = None,
    overwrite: bool = False,
) -> str:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` for peft's BEFT tuner.

    Args:
        source: a ``BeftAdapter`` (``trainer.build_adapter()``) or the folder of a saved adapter.
        out_dir: the peft adapter folder to write.
        base_model: the adapter's base model, always checked as ``load_adapter`` checks it. Needed when
            the head holds a backbone bias (BERT's pooler bias named in ``head_modules``): peft gets
            it as one more BEFT delta, against the base model's value.
        overwrite: replace the files of a non-empty ``out_dir`` (by default refused before anything is written).

    ``PeftModel.from_pretrained(base_model, out_dir)`` then gives the trained model's outputs (to float
    rounding: peft adds each float32 delta after the layer, and where a bias crossed zero the merged bias
    can land one ulp away; ``beft_trainer.load_adapter`` is the bit-exact path). Raises ``PeftExportError``
    if the adapter holds biases peft cannot represent, or if ``out_dir`` is not empty and ``overwrite`` is False.
    """
    peft = _import_peft()
    adapter = _as_adapter(source)
    if base_model is not None:  # checked once here, even where the export reads nothing of it
        _check_base_model(adapter, base_model)
    if adapter.metadata.scaling_types:
        return _export_ia3(peft, adapter, os.fspath(out_dir), base_model, overwrite)
    reasons = peft_unsupported(adapter)
    if reasons:
        raise PeftExportError(
            "peft's BEFT tuner adds a vector to nn.Linear outputs only, so this adapter cannot be exported: "
            + "; ".join(reasons)
            + ". Load it with beft_trainer.load_adapter(), or train linear bias types (q, k, v, ...)."
        )
    out_dir = os.fspath(out_dir)
    check_out_dir(out_dir, overwrite)
    metadata = adapter.metadata
    deltas = dict(adapter.deltas)
    head = dict(adapter.head)
    backbone_head = [n for n in head if _in_backbone(n, metadata.backbone_prefix)]
    if backbone_head:
        deltas |= _deltas_against_base(adapter, {n: head.pop(n) for n in backbone_head}, base_model)
    targets = {name.removesuffix(".bias"): delta for name, delta in deltas.items()}
    config = peft.BeftConfig(
        target_modules=sorted(targets),
        modules_to_save=sorted({name.split(".", 1)[0] for name in head}) or None,
        base_model_name_or_path=metadata.base_model,
        task_type=_task_type(metadata.model_class),
        inference_mode=True,
    )
    os.makedirs(out_dir, exist_ok=True)
    config.save_pretrained(out_dir)
    # peft stores each delta as a (1, out_features) row; its keys drop the adapter name.
    tensors = {
        f"{_PEFT_PREFIX}{target}.beft_bias": delta.float().reshape(1, -1).contiguous()
        for target, delta in targets.items()
    }
    tensors |= {f"{_PEFT_PREFIX}{name}": value.contiguous() for name, value in head.items()}
    save_file(tensors, os.path.join(out_dir, PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
    return out_dir


def _export_ia3(peft, adapter: BeftAdapter, out_dir: str, base_model: nn.Module | None, overwrite: bool) -> str:
    targets = ia3_targets(adapter, base_model)
    head, saved_modules = dict(adapter.head), {name.split(".", 1)[0] for name in adapter.head}
    backbone_head = [n for n in head if _in_backbone(n, adapter.metadata.backbone_prefix)]
    if backbone_head:
        # IA3 holds no bias delta: a trained head bias inside the backbone (BERT's pooler) goes
        # out with its whole module, the other parameters taken from the base model.
        head, saved_modules = _with_whole_backbone_modules(adapter, head, backbone_head, base_model)
    check_out_dir(out_dir, overwrite)
    metadata = adapter.metadata
    write_ia3(
        peft,
        head,
        targets,
        out_dir,
        modules_to_save=sorted(saved_modules) or None,
        base_model_name_or_path=metadata.base_model,
        task_type=_task_type(metadata.model_class),
    )
    return out_dir


def _with_whole_backbone_modules(
    adapter: BeftAdapter, head: dict[str, torch.Tensor], backbone_head: list[str], base_model: nn.Module | None
) -> tuple[dict[str, torch.Tensor], set[str]]:
    base_model = _required_base_model(backbone_head, base_model, "peft saves its whole module")
    parents = {name.rsplit(".", 2)[0] for name in backbone_head}  # bert.pooler.dense.bias -> bert.pooler
    params = dict(base_model.named_parameters())
    for parent in parents:
        for name, value in params.items():
            if name.startswith(parent + ".") and name not in head:
                head[name] = value.detach().float().clone()
    modules = {name.split(".", 1)[0] for name in head if not any(name.startswith(p + ".") for p in parents)}
    return head, modules | {parent.rsplit(".", 1)[-1] for parent in parents}


def _check_base_model(adapter: BeftAdapter, base_model: nn.Module) -> None:
    """Give ``base_model`` the trainer's parameter layout and refuse it unless the adapter was trained from it."""
    prepare_base_model(base_model, adapter.metadata)
    check_prepared(base_model, adapter)


def _required_base_model(names: list[str], base_model: nn.Module | None, why: str) -> nn.Module:
    """The base model (``export_peft`` has prepared and checked it); refused when missing, saying ``why`` it is needed."""
    if base_model is None:
        raise PeftExportError(
            f"The head includes {', '.join(names[:3])}, inside the backbone: {why}, so pass base_model= "
            "(on the command line: --base-model PATH)."
        )
    return base_model


def _import_peft():
    try:
        import peft
    except ImportError as error:  # pragma: no cover - peft is an optional extra
        raise PeftExportError("Exporting to peft needs peft >= 0.20: pip install 'beft-trainer[peft]'.") from error
    if not hasattr(peft, "BeftConfig"):
        raise PeftExportError(f"peft {peft.__version__} has no BEFT tuner; upgrade to peft >= 0.20.")
    return peft


def _deltas_against_base(
    adapter: BeftAdapter, trained: dict[str, torch.Tensor], base_model: nn.Module | None
) -> dict[str, torch.Tensor]:
    """Deltas of trained head biases inside the backbone against the base model's values.

    peft's ``modules_to_save`` must hold every parameter of a module (BERT's whole pooler
    weight), so a lone trained bias of a backbone ``nn.Linear`` is exported as a BEFT delta.
    """
    names = list(trained)
    base_model = _required_base_model(names, base_model, "peft gets it as a delta against the base model")
    params = dict(base_model.named_parameters())
    modules = dict(base_model.named_modules())
    deltas = {}
    for name in names:
        module = modules.get(name.rsplit(".", 1)[0])
        if not (name.endswith(".bias") and isinstance(module, nn.Linear)):
            raise PeftExportError(
                f"Head parameter {name} is inside the backbone but is not the bias of an nn.Linear; "
                "peft cannot represent it. Train with BeftConfig(head_modules=...) naming whole modules."
            )
        deltas[name], _ = exact_delta(params[name].detach().float(), trained[name])
    return deltas


def _as_adapter(source: BeftAdapter | str | os.PathLike) -> BeftAdapter:
    if isinstance(source, BeftAdapter):
        return source
    if isinstance(source, (str, os.PathLike)):
        return read_adapter(source)
    raise PeftExportError(
        f"export_peft takes a BeftAdapter (e.g. trainer.build_adapter()) or an adapter folder, "
        f"not {type(source).__name__}."
    )


#: What each kind of writer puts into its folder, for the messages.
_KIND_FILES = {"peft": "adapter", "model": "model"}


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool = False, writing: str = "peft") -> None:
    """Raise ``PeftExportError`` unless ``out_dir`` is new or empty (or ``overwrite``), before any write.

    ``writing`` is ``"peft"`` (an adapter folder) or ``"model"`` (a merged checkpoint). A folder holding
    files of the other kind is refused even with ``overwrite``: transformers' ``from_pretrained(folder)``
    applies a folder's peft adapter on top of the folder's own model, so the two would be loaded together.
    """
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise PeftExportError(f"{out_dir} is a file, not a folder; pass a new or empty folder.")
    held = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    marker, files, why = _OTHER_KIND[writing]
    if marker in held:
        present = ", ".join(f for f in files if f in held)
        raise PeftExportError(
            f"{out_dir} holds {present}: {why}. Overwriting replaces only the files this writes and deletes "
            "nothing: write to another folder, or remove those files first."
        )
    if not overwrite and held:
        raise PeftExportError(
            f"{out_dir} is not empty (holds {', '.join(held[:3])}{', ...' if len(held) > 3 else ''}); pass a new or empty "
            f"folder, or overwrite=True (on the command line: --overwrite) to replace its {_KIND_FILES[writing]} files."
        )


def _in_backbone(name: str, backbone_prefix: str | None) -> bool:
    return backbone_prefix is not None and name.startswith(backbone_prefix + ".")


def _task_type(model_class: str | None) -> str | None:
    for suffix, task_type in _TASK_TYPES.items():
        if model_class and model_class.endswith(suffix):
            return task_type
    return None
