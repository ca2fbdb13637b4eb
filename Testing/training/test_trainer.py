"""The recipe end to end on the tiny real-CT dataset: resume after a kill, stage 2 on stage 1, torchrun."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from maxquery_training.trainer import load_checkpoint, poly_lr

ITERS = 8


def _train_cmd(data, work, *extra):
    return [sys.executable, "-m", "maxquery_training.cli", "train", "--config", "tiny", "--data", str(data),
            "--work", str(work), "--stage", "1", "--set", "stage1.epochs=4",
            "--set", f"stage1.iterations_per_epoch={ITERS}", *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_poly_lr_decays_to_zero():
    assert poly_lr(1.0, 0, 100, 0.9) == 1.0
    assert 0 < poly_lr(1.0, 99, 100, 0.9) < poly_lr(1.0, 50, 100, 0.9) < 1.0


def test_config_files_read_exponent_numbers_as_numbers(tmp_path):
    from maxquery_training.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("stage1: {learning_rate: 1e-3, epochs: 2}\nname: 1e3x\n")
    config = load_config(path)
    assert config.stage1.learning_rate == 0.001 and config.name == "1e3x"


def test_killed_run_resumes_where_it_stopped(tiny_msd, tmp_path):
    reference_work = tmp_path / "uninterrupted"
    subprocess.run(_train_cmd(tiny_msd, reference_work), check=True, env=_env(), capture_output=True)
    reference = load_checkpoint(reference_work / "stage1" / "checkpoint.pt")

    work = tmp_path / "killed"
    checkpoint = work / "stage1" / "checkpoint.pt"
    proc = subprocess.Popen(_train_cmd(tiny_msd, work), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.1)  # now inside the next epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted = load_checkpoint(checkpoint)
    stopped_at = interrupted["epoch"]
    assert 1 <= stopped_at < 4, "the kill should land mid-run"
    assert not list(checkpoint.parent.glob("*.tmp")), "no half-written checkpoint is left"

    subprocess.run(_train_cmd(tiny_msd, work), check=True, env=_env(), capture_output=True)
    resumed = load_checkpoint(checkpoint)
    assert resumed["epoch"] == 4 and len(resumed["history"]) == 4
    assert resumed["history"][:stopped_at] == interrupted["history"]
    steps = {int(s["step"]) for s in resumed["optimizer"]["state"].values()}
    assert steps == {4 * ITERS}, "optimiser state continued, not restarted"
    for mine, ref in zip(resumed["history"], reference["history"]):
        assert mine["loss"] == pytest.approx(ref["loss"], rel=1e-4), "the loss curve continues as uninterrupted"


def test_stopped_run_keeps_the_schedule_of_all_epochs(tiny_msd, tmp_path):
    """stop_after_epoch ends a run early (to resume later, e.g. with other settings) without
    shortening its learning-rate schedule."""
    from maxquery_training.config import load_config

    work = tmp_path / "w"
    checkpoint = work / "stage1" / "checkpoint.pt"
    subprocess.run(_train_cmd(tiny_msd, work, "--set", "stage1.stop_after_epoch=1"), check=True, env=_env(),
                   capture_output=True)
    stopped = load_checkpoint(checkpoint)
    assert stopped["epoch"] == 1
    stage = load_config("tiny").stage1
    assert stopped["history"][0]["lr"] == pytest.approx(poly_lr(stage.learning_rate, ITERS - 1, 4 * ITERS,
                                                                stage.poly_exponent))
    subprocess.run(_train_cmd(tiny_msd, work), check=True, env=_env(), capture_output=True)
    resumed = load_checkpoint(checkpoint)
    assert resumed["epoch"] == 4 and resumed["history"][0] == stopped["history"][0]

    refused = subprocess.run(_train_cmd(tiny_msd, work, "--set", "stage1.stop_after_epoch=-1"), env=_env(),
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "stop_after_epoch" in refused.stderr


def test_stage2_starts_from_stage1_backbone_and_freezes_it(tiny_msd, tmp_path):
    work = tmp_path / "w"
    subprocess.run([sys.executable, "-m", "maxquery_training.cli", "train", "--config", "tiny", "--data",
                    str(tiny_msd), "--work", str(work), "--set", "stage2.epochs=1"], check=True, env=_env(),
                   capture_output=True)
    stage1 = load_checkpoint(work / "stage1" / "checkpoint.pt")["model"]
    stage2 = load_checkpoint(work / "stage2" / "checkpoint.pt")
    for key, value in stage1.items():
        if key.startswith("backbone."):
            torch.testing.assert_close(stage2["model"][key], value)  # frozen during its only epoch
    assert {"seg", "qd"} <= set(stage2["history"][0])


def test_stage2_needs_stage1(tiny_msd, tmp_path):
    result = subprocess.run([sys.executable, "-m", "maxquery_training.cli", "train", "--config", "tiny", "--data",
                             str(tiny_msd), "--work", str(tmp_path), "--stage", "2"], env=_env(),
                            capture_output=True, text=True)
    assert result.returncode == 2 and "run stage 1 first" in result.stderr


def test_torchrun_two_cpu_processes(tiny_msd, tmp_path):
    work = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "maxquery_training.cli", "train", "--config", "tiny", "--data", str(tiny_msd), "--work", str(work),
         "--stage", "1", "--device", "cpu"],
        env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    state = load_checkpoint(work / "stage1" / "checkpoint.pt")
    assert state["epoch"] == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in state["history"])


def test_resumed_run_takes_the_optimiser_betas_from_the_config(tiny_msd, tmp_path):
    """A run resumed with new RAdam betas (e.g. a shorter warm-up for a short CPU run) uses them."""
    work = tmp_path / "w"
    subprocess.run(_train_cmd(tiny_msd, work, "--set", "stage1.epochs=1"), check=True, env=_env(), capture_output=True)
    first = load_checkpoint(work / "stage1" / "checkpoint.pt")
    assert [tuple(g["betas"]) for g in first["optimizer"]["param_groups"]] == [(0.9, 0.999)]
    subprocess.run(_train_cmd(tiny_msd, work, "--set", "stage1.epochs=2", "--set", "stage1.betas=[0.9, 0.99]",
                              "--set", "stage1.learning_rate=1e-3"), check=True, env=_env(), capture_output=True)
    resumed = load_checkpoint(work / "stage1" / "checkpoint.pt")
    assert resumed["epoch"] == 2
    assert [tuple(g["betas"]) for g in resumed["optimizer"]["param_groups"]] == [(0.9, 0.99)]
    assert resumed["history"][1]["lr"] < 1e-3  # "1e-3" is read as a number, not a string
