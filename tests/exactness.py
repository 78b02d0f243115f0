"""Checks shared by the backend tests: read what exactness_run.py wrote and compare exactly."""

from __future__ import annotations

import glob
import json
import os

import torch
from safetensors.torch import load_file


def load_runs(out_dir: str) -> list[tuple[dict, dict[str, torch.Tensor]]]:
    """Every rank's (record, tensors) written by tests/scripts/exactness_run.py."""
    runs = []
    for path in sorted(glob.glob(os.path.join(out_dir, "rank*.json"))):
        with open(path) as f:
            record = json.load(f)
        runs.append((record, load_file(path.replace(".json", ".safetensors"))))
    return runs


def assert_exact_selection_run(out_dir: str, world_size: int) -> None:
    """The guarantees of DESIGN.md 1-3 on one finished run, for every rank."""
    runs = load_runs(out_dir)
    assert len(runs) == world_size, f"expected {world_size} ranks, found {len(runs)}"
    selections = [record["selected"] for record, _ in runs]
    assert all(s == selections[0] for s in selections), f"ranks disagree: {selections}"
    for record, tensors in runs:
        _assert_rank(record, tensors)
    _assert_attribution_is_shared(runs)
    _assert_adapter_reproduces(out_dir, runs[0][1], runs[0][0].get("bf16_representable", False))
    # Every rank ends with the same model.
    first = runs[0][1]
    for _, tensors in runs[1:]:
        for key in first:
            if key.startswith("final/"):
                assert torch.equal(first[key], tensors[key]), f"{key} differs between ranks"


def _assert_attribution_is_shared(runs) -> None:
    """Every rank credits the same loss to each type (its statistics are summed over ranks), and training removed some."""
    credits = [{t: e["attribution"] for t, e in record["report"]["scores"].items()} for record, _ in runs]
    assert all(c == credits[0] for c in credits), f"ranks disagree on attribution: {credits}"
    assert max(credits[0].values()) > 0, f"no type removed any loss while probing: {credits[0]}"


def _assert_rank(record: dict, tensors: dict[str, torch.Tensor]) -> None:
    selected = record["selected"]
    assert len(selected) == 1 and selected[0] in record["report"]["candidates"], selected
    names = sorted(k[len("final/") :] for k in tensors if k.startswith("final/"))
    assert names, "no parameters recorded"
    trained = set(record["bias_names"][selected[0]]) | set(record["head"])
    assert record["head"], "the head was not detected"
    frozen_after_switch = [n for n in names if n not in trained]
    assert len(frozen_after_switch) > len(trained)
    for name in frozen_after_switch:
        switch, final = tensors[f"switch/{name}"], tensors[f"final/{name}"]
        assert torch.equal(switch, final), f"{name} moved after the switch"
        # With rewind, everything outside the selected type and the head is pretrained.
        assert torch.equal(final, tensors[f"init/{name}"]), f"{name} differs from its pretrained value"
    for name in record["bias_names"][selected[0]]:
        assert not torch.equal(tensors[f"switch/{name}"], tensors[f"final/{name}"]), f"selected {name} did not train"
    _assert_frozen_state_zeroed(record, tensors)
    for name in record["head"]:
        assert not torch.equal(tensors[f"init/{name}"], tensors[f"final/{name}"]), f"head {name} did not train"


def _assert_frozen_state_zeroed(record: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Right after the switch, the Adam moments of every frozen bias type are zero (the selected type's are not)."""
    selected = record["selected"][0]
    for bias_type in record["report"]["candidates"]:
        for name in record["bias_names"][bias_type]:
            for key in ("exp_avg", "exp_avg_sq"):
                state = tensors.get(f"state/{key}/{name}")
                assert state is not None, f"no {key} recorded for {name}"
                if bias_type == selected:
                    assert state.abs().sum() > 0, f"selected {name}: {key} is zero, so the check below proves nothing"
                else:
                    assert not state.any(), f"frozen {name}: {key} was not zeroed at the switch"


def _assert_adapter_reproduces(out_dir: str, tensors: dict[str, torch.Tensor], bf16_representable: bool) -> None:
    """The adapter saved by save_model() turns a fresh base model into the trained one, exactly."""
    from helpers import tiny_bert
    from scripts.exactness_run import bf16_representable as round_to_bf16

    from beft_trainer import load_adapter

    model = round_to_bf16(tiny_bert()) if bf16_representable else tiny_bert()
    load_adapter(model, os.path.join(out_dir, "model"))
    for name, param in model.named_parameters():
        assert torch.equal(param.detach().float(), tensors[f"final/{name}"]), f"adapter does not reproduce {name}"
