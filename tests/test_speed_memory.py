"""The speed/memory benchmark: its report from JSON lines (ratios within repeats, missing rows listed, targets
judged), and a real tiny CPU run that writes one line per row and resumes without rerunning anything."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "speed_memory.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # speed_memory.py imports its sibling common.py
spec = importlib.util.spec_from_file_location("benchmarks_speed_memory", SCRIPT)
speed_memory = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = speed_memory
spec.loader.exec_module(speed_memory)

GIB = 2**30
SETTINGS = {
    "device": "cuda", "bf16": True, "batch_size": 8, "seq_len": 512, "warmup": 5, "steps": 20,
    "run_steps": 60, "probe_steps": 10, "threads": 1,
}  # fmt: skip


def _row(size, method, repeat, step_s, peak_gib, config="", **extra):
    row = {"size": size, "method": method, "repeat": repeat, "config": config, "status": "ok", "step_s": step_s}
    row |= {"cuda_peak_bytes": int(peak_gib * GIB), "parameters": 1_300_000_000, "trainable": 1, "hardware": "H100"}
    return SETTINGS | row | {"weights_dtype": "bf16", "optimizer": "AdamW(fused)"} | extra


def _rows():
    rows = []
    # 1.3b, two repeats whose speeds differ: ratios must be taken within each repeat.
    for repeat, scale in ((0, 1.0), (1, 2.0)):
        rows += [
            _row("1.3b", "forward", repeat, 0.10 * scale, 4.0),
            _row("1.3b", "full", repeat, 0.40 * scale, 30.0),
            _row("1.3b", "v_bf16", repeat, 0.20 * scale, 9.0),  # 2.0x forward, 0.50x full, 0.30x peak
            _row("1.3b", "beft_run", repeat, 0.2, 9.0, run_s=10.8 * scale),
            _row("1.3b", "fixed_v_run", repeat, 0.2, 9.0, run_s=10.0 * scale),  # ratio 1.08: not met
        ]
    rows.append(SETTINGS | {"size": "1.3b", "method": "lora", "repeat": 0, "config": "", "status": "failed",
                            "reason": "CUDA out of memory: tried to allocate 2 GiB"})  # fmt: skip
    rows += [
        _row("6.7b", "forward", 0, 0.5, 14.0),
        _row("6.7b", "v_bf16", 0, 1.0, 28.0),
        _row("6.7b", "ds_zero3", 0, 1.4, 20.0, config="ds_configs/zero3.json"),  # 1.4x plain: met
        _row("6.7b", "ds_zero3_offload", 0, 3.8, 19.0, config="ds_configs/zero3_offload.json"),  # 19 GiB: not met
        SETTINGS | {"size": "6.7b", "method": "full", "repeat": 0, "config": "", "status": "skipped",
                    "reason": "cannot fit: weights, gradients and optimizer state ~99.8 GiB > 90% of 79.2 GiB"},
    ]  # fmt: skip
    return rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_takes_ratios_within_repeats_lists_missing_rows_and_judges_targets(tmp_path):
    runs = tmp_path / "runs.jsonl"
    _write(runs, _rows())
    speed_memory.write_report([runs], tmp_path / "report")
    summary = json.loads((tmp_path / "report.json").read_text())["summary"]
    v = summary["1.3b"]["v_bf16"]
    assert v["step_vs_forward"] == 2.0 and v["step_vs_full"] == 0.5
    assert abs(v["mem_vs_full"] - 0.3) < 1e-9 and abs(v["mem_vs_forward"] - 2.25) < 1e-9
    assert abs(summary["1.3b"]["beft_run"]["run_vs_fixed"] - 1.08) < 1e-9
    assert "step_vs_full" not in summary["6.7b"]["v_bf16"] or summary["6.7b"]["v_bf16"]["step_vs_full"] is None
    assert abs(summary["6.7b"]["ds_zero3 (zero3.json)"]["step_vs_plain"] - 1.4) < 1e-9
    md = (tmp_path / "report.md").read_text()
    assert "| 1.3b | lora | 0 | failed | CUDA out of memory" in md
    assert "| 6.7b | full | 0 | skipped | cannot fit" in md
    expected = {
        "selected phase step <= 2.15x the forward pass: v_bf16 2.00 -> **met**",
        "selected phase step <= 0.60x the full FT step: v_bf16 0.50 -> **met**",
        "selected phase peak memory <= 0.40x full FT's peak: v_bf16 0.30 -> **met**",
        "whole BEFT run within 5% of a fixed-v run of the same length: beft_run 1.08 -> **not met**",
        "ZeRO-3 step within 1.5x of the plain step: ds_zero3 (zero3.json) 1.40 -> **met**",
        "ZeRO-3 with offload: peak <= 18 GiB: ds_zero3_offload (zero3_offload.json) 19.00 -> **not met**",
    }
    for line in expected:
        assert line in md, line
    assert "compare them with v_bf16" in md
    assert (tmp_path / "report.png").stat().st_size > 0


def test_a_missing_reference_is_not_a_met_target(tmp_path):
    rows = [r for r in _rows() if not (r["size"] == "1.3b" and r["method"] == "full")]
    lines = speed_memory.target_lines(speed_memory.summarise(rows, True), bf16=True, gpu=True)
    assert any("0.60x the full FT step: not measured (rows missing" in line for line in lines)


def test_v_amp_is_dropped_under_bf16(capsys):
    opts = speed_memory.build_parser().parse_args(
        ["run", "--bf16", "--repeats", "1", "--methods", "v", "v_amp", "ds_zero3", "--sizes", "tiny", "--runs", "x"]
    )
    assert [r["method"] for r in speed_memory.plan_rows(opts)] == ["v", "ds_zero3"]
    assert "v_amp dropped" in capsys.readouterr().out
    assert speed_memory.plan_rows(opts)[1]["config"] == "ds_configs/zero3.json"


def test_a_row_that_cannot_fit_is_skipped_with_its_estimate():
    opts = speed_memory.build_parser().parse_args(["worker", "--size", "tiny", "--method", "full"])
    assert speed_memory.skip_reason("tiny", "full", opts) is None  # CPU: no budget unless given
    opts.memory_budget_gib = 0.1
    skipped = speed_memory.skip_reason("tiny", "full", opts)
    assert skipped["status"] == "skipped" and skipped["estimate_bytes"] == 16 * speed_memory.parameter_count("tiny")
    assert speed_memory.skip_reason("tiny", "v_bf16", opts) is None  # 2 bytes per parameter fit


def test_a_tiny_cpu_run_writes_one_line_per_row_and_resumes(tmp_path, monkeypatch, capsys):
    for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        monkeypatch.setenv(name, value)
    runs = tmp_path / "runs.jsonl"
    argv = ["run", "--sizes", "tiny", "--methods", "forward", "v", "--steps", "1", "--warmup", "1", "--repeats", "1"]
    speed_memory.main([*argv, "--runs", str(runs), "--out", str(tmp_path / "cpu")])
    rows = {r["method"]: r for r in map(json.loads, runs.read_text().splitlines())}
    assert rows["forward"]["status"] == rows["v"]["status"] == "ok", rows
    assert rows["v"]["trainable"] > 0 and rows["v"]["step_s"] > 0 and "AdamW" in rows["v"]["optimizer"]
    assert rows["v"]["state_bytes"] > rows["forward"]["state_bytes"]  # + gradients and Adam state of v and head
    summary = json.loads((tmp_path / "cpu.json").read_text())["summary"]["tiny"]
    assert summary["v"]["step_vs_forward"] == rows["v"]["step_s"] / rows["forward"]["step_s"]
    capsys.readouterr()
    speed_memory.main([*argv, "--runs", str(runs)])  # resumes: nothing new runs
    assert "0 rows to run (2 already" in capsys.readouterr().out
    assert len(runs.read_text().splitlines()) == 2
