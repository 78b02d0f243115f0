"""The guarantees on every backend: DDP (torchrun and accelerate, gloo) and DeepSpeed ZeRO-2/3 on CPU.

Each case launches tests/scripts/exactness_run.py in fresh processes and checks, on every rank:
frozen parameters bit-identical after the switch and equal to their pretrained values (rewind),
their Adam moments zeroed at the switch, the selected type trained, the same selection and the
same final model on all ranks. Two processes on one machine stand in for several machines.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from exactness import assert_exact_selection_run, load_runs

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "exactness_run.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment(gpu: bool = False) -> dict[str, str]:
    """The launch environment: offline, one thread, and no GPU unless ``gpu`` (the CPU cases stay on gloo)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    # Keep PYTHONPATH's entries: a GPU machine may hold DeepSpeed in a --target folder named there.
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _launch(command: list[str], timeout: int = 400, gpu: bool = False) -> None:
    result = subprocess.run(command, env=_environment(gpu), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def _torchrun(nproc: int, *script_args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={_free_port()}",
        SCRIPT,
        *script_args,
    ]


def _deepspeed(nproc: int, *script_args: str) -> list[str]:
    # The launcher's module, not its console script: a --target install of DeepSpeed has no script on PATH.
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner"]
    return [*launcher, f"--num_gpus={nproc}", f"--master_port={_free_port()}", SCRIPT, *script_args]


@pytest.mark.distributed
def test_ddp_two_processes(tmp_path):
    _launch(_torchrun(2, "--out", str(tmp_path)))
    assert_exact_selection_run(str(tmp_path), world_size=2)


@pytest.mark.distributed
def test_ddp_two_processes_through_accelerate(tmp_path):
    # accelerate's DDP launcher with the Trainer's use_cpu=True (set by the script) runs gloo on CPU.
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    command = [launcher, "launch", "--multi_gpu", "--num_processes=2", "--num_machines=1", "--mixed_precision=no"]
    command += ["--dynamo_backend=no", f"--main_process_port={_free_port()}", SCRIPT, "--out", str(tmp_path)]
    _launch(command)
    assert_exact_selection_run(str(tmp_path), world_size=2)


@pytest.mark.distributed
@pytest.mark.deepspeed
@pytest.mark.parametrize(
    ("stage", "nproc", "grad_accum"),
    [(2, 2, 1), (3, 2, 1), (2, 1, 2), (3, 1, 2)],
    ids=["zero2-2proc", "zero3-2proc", "zero2-1proc-accum2", "zero3-1proc-accum2"],
)
def test_deepspeed_zero(stage, nproc, grad_accum, tmp_path):
    pytest.importorskip("deepspeed", reason="install the [deepspeed] extra")
    _launch(_deepspeed(nproc, "--out", str(tmp_path), "--zero_stage", str(stage), "--grad_accum", str(grad_accum)))
    assert_exact_selection_run(str(tmp_path), world_size=nproc)
    assert load_runs(str(tmp_path))[0][0]["report"]["step"] == 4


@pytest.mark.distributed
@pytest.mark.deepspeed
def test_deepspeed_zero3_with_cpu_offload(tmp_path):
    """ds_configs/zero3_offload.json's setting: the Trainer's AdamW steps fp32 partitions held in CPU memory."""
    pytest.importorskip("deepspeed", reason="install the [deepspeed] extra")
    _launch(_deepspeed(1, "--out", str(tmp_path), "--zero_stage", "3", "--offload"))
    assert_exact_selection_run(str(tmp_path), world_size=1)


@pytest.mark.distributed
@pytest.mark.deepspeed
@pytest.mark.parametrize(
    "section",
    [
        {"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}},
        # Its schedule writes every group's rate from its own max_lrs: a frozen group would train again.
        {"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": "auto", "warmup_num_steps": "auto"}}},
    ],
    ids=["optimizer", "scheduler"],
)
def test_deepspeed_optimizer_and_scheduler_sections_are_refused(section, tmp_path):
    pytest.importorskip("deepspeed", reason="install the [deepspeed] extra")
    name = next(iter(section))
    code = f"""
import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})
from helpers import tiny_bert, training_args, TokenDataset
from scripts.exactness_run import zero_config
from beft_trainer import BeftTrainer, BeftConfigError
config = zero_config(2) | {section!r}
try:
    BeftTrainer(tiny_bert(), training_args({str(tmp_path)!r}, deepspeed=config), train_dataset=TokenDataset())
except BeftConfigError as error:
    assert "'{name}' section" in str(error), error
    print("REFUSED")
"""
    env = _environment() | {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert "REFUSED" in result.stdout, result.stdout[-2000:] + result.stderr[-4000:]


@pytest.mark.distributed
@pytest.mark.deepspeed
def test_flipping_requires_grad_is_not_enough_under_zero2(tmp_path):
    """Negative control: the check above fails when the freeze only flips requires_grad."""
    pytest.importorskip("deepspeed", reason="install the [deepspeed] extra")
    _launch(_deepspeed(1, "--out", str(tmp_path), "--zero_stage", "2", "--naive_freeze"))
    with pytest.raises(AssertionError, match="moved after the switch"):
        assert_exact_selection_run(str(tmp_path), world_size=1)


@pytest.mark.deepspeed
def test_deepspeed_cpu_adam_moves_nothing_at_lr_0():
    """DeepSpeed's CPU Adam applies lr, weight decay and bias correction per group: a frozen group stays exact."""
    adam = pytest.importorskip("deepspeed.ops.adam", reason="install the [deepspeed] extra")
    from beft_trainer.distributed import reset_optimizer_state, zero_group_learning_rates

    torch.manual_seed(0)
    trained, frozen = torch.nn.Parameter(torch.randn(1000)), torch.nn.Parameter(torch.randn(1000))
    groups = [{"params": [trained], "weight_decay": 0.1}, {"params": [frozen], "weight_decay": 0.1}]
    optimizer = adam.DeepSpeedCPUAdam(groups, lr=1e-2, adamw_mode=True)
    for step in range(6):
        if step == 3:  # the switch
            zero_group_learning_rates(optimizer, None, [1])
            reset_optimizer_state(optimizer, [1])
            assert not optimizer.state[frozen]["exp_avg"].any() and not optimizer.state[frozen]["exp_avg_sq"].any()
            at_switch = (trained.detach().clone(), frozen.detach().clone())
        trained.grad, frozen.grad = torch.randn(1000), torch.randn(1000)
        optimizer.step()
    assert torch.equal(frozen, at_switch[1]), "a group at lr 0 moved under DeepSpeedCPUAdam"
    assert not torch.equal(trained, at_switch[0])


#: Scaling vectors only, so that the selected type is one too (SSL and SSB halves on v, the MLP's output scaling).
FAMILY = "v_scale_in,v_scale_out,mlp_in_scale_out"


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [0, 2, 3], ids=["ddp", "zero2", "zero3"])
def test_scaling_vectors_freeze_exactly_on_two_processes(stage, tmp_path):
    if stage:
        pytest.importorskip("deepspeed", reason="install the [deepspeed] extra")
        _launch(_deepspeed(2, "--out", str(tmp_path), "--zero_stage", str(stage), "--candidates", FAMILY))
    else:
        _launch(_torchrun(2, "--out", str(tmp_path), "--candidates", FAMILY))
    assert_exact_selection_run(str(tmp_path), world_size=2)
    report = load_runs(str(tmp_path))[0][0]["report"]
    assert report["candidates"] == FAMILY.split(",") and report["scores"]["v_scale_in"]["kind"] == "scale"
