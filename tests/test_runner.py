"""The runner end to end: outputs, non-finite guards, SIGKILL + --resume, and DDP with 2 CPU processes."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from firm.runner import NonFiniteWeightsError, _checkpoint_io, run

REPO = Path(__file__).resolve().parent.parent
TOY = REPO / "experiments" / "demo" / "toy_regression.yaml"
PROBE = REPO / "tests" / "helpers" / "probe_module.py"


def read_metrics(run_dir: Path, version: int) -> list[dict]:
    with open(run_dir / "csv" / f"version_{version}" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def probe_yaml(tmp_path: Path, **trainer) -> Path:
    lines = "".join(f"  {k}: {v}\n" for k, v in trainer.items())
    path = tmp_path / "probe.yaml"
    path.write_text(
        f"base: {TOY}\nname: probe\noutput_root: {tmp_path / 'runs'}\nimports: [{PROBE}]\n"
        f"module: {{name: probe}}\ntrainer:\n  enable_progress_bar: false\n{lines}"
    )
    return path


def test_run_writes_config_logs_and_checkpoints(tmp_path, monkeypatch):
    monkeypatch.delenv("FIRM_RUN_DIR", raising=False)
    usr1 = signal.getsignal(signal.SIGUSR1)
    run_dir = run(
        str(TOY),
        [
            f"output_root={tmp_path}",
            "trainer.max_steps=30",
            "trainer.checkpoint_every_n_steps=10",
            "trainer.val_check_interval=15",
            "trainer.enable_progress_bar=false",
        ],
    )
    assert run_dir.parent == tmp_path / "toy_regression"
    assert (run_dir / "config.yaml").is_file() and (run_dir / "meta.json").is_file()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 30
    rows = read_metrics(run_dir, 0)
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses and losses[-1] < losses[0]  # it learns
    assert any(r.get("val/loss") for r in rows)
    assert list((run_dir / "tb" / "version_0").glob("events.out.tfevents.*"))
    assert signal.getsignal(signal.SIGUSR1) == usr1  # the preemption handler lives only as long as the fit


def test_checkpoint_io_refuses_nan_weights(tmp_path):
    io = _checkpoint_io()
    with pytest.raises(NonFiniteWeightsError, match="w"):
        io.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("nan")])}}, tmp_path / "x.ckpt")
    assert not (tmp_path / "x.ckpt").exists()
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, tmp_path / "ok.ckpt")
    assert io.load_checkpoint(tmp_path / "ok.ckpt")["global_step"] == 3
    assert not list(tmp_path.glob(".*tmp*"))  # no temp files left behind


def test_nan_loss_skips_the_step_and_weights_stay_finite(tmp_path, monkeypatch):
    monkeypatch.delenv("FIRM_RUN_DIR", raising=False)
    exp = probe_yaml(tmp_path, max_steps=12, checkpoint_every_n_steps=5)
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        run_dir = run(str(exp), ["module.nan_at_step=3"])
    weights = load_file(str(run_dir / "weights_rank0.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["firm_skipped_nonfinite"] == 1
    # the skipped batch consumes a batch but not an optimizer step
    assert ckpt["global_step"] == 12


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, subprocess_env):
    steps, every = 400, 20
    exp = probe_yaml(tmp_path, max_steps=steps, checkpoint_every_n_steps=every, val_check_interval=1000)
    cmd = [sys.executable, "-m", "firm", "run", str(exp)]

    # Uninterrupted reference run.
    subprocess.run([*cmd, "name=reference"], env=subprocess_env, check=True, capture_output=True, timeout=300)
    ref_dir = next((tmp_path / "runs" / "reference").iterdir())

    # A run killed with SIGKILL as soon as its first checkpoint exists.
    proc = subprocess.Popen(cmd, env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    last = None
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / "runs" / "probe").glob("*/checkpoints/last.ckpt"))
        if found:
            last = found[0]
            break
        time.sleep(0.02)
    assert last is not None, "no checkpoint appeared"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    run_dir = last.parent.parent
    killed_at = torch.load(last, weights_only=True)["global_step"]
    assert 0 < killed_at < steps, "the run finished before it could be killed; make it longer"

    out = subprocess.run(
        [sys.executable, "-m", "firm", "run", "--resume", str(run_dir)],
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "resuming from" in out.stdout
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == steps
    resumed_steps = [int(r["step"]) for r in read_metrics(run_dir, 1) if r.get("train/loss")]
    assert min(resumed_steps) >= killed_at  # continued, did not start over
    # Exact continuation: same data order and RNG state, so the same final weights as the uninterrupted run.
    a = load_file(str(ref_dir / "weights_rank0.safetensors"))
    b = load_file(str(run_dir / "weights_rank0.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_signal_checkpoints_at_the_next_step_exits_143_and_the_resume_is_exact(tmp_path, subprocess_env, monkeypatch):
    """SIGTERM (a scheduler's stop) and SIGUSR1 (SLURM's --signal) write last.ckpt at the end of the running step and
    stop the run with status 143 and the command that continues it; that continuation ends with the uninterrupted
    run's weights. Inside a SLURM job, SIGUSR1 also requeues the job (`scontrol requeue`, here a stand-in that
    records its arguments), and the requeued job's `firm run` of the same experiment continues the run by itself.
    With gradient accumulation the checkpoint is written only where an optimizer step ends."""
    steps, every = 400, 20
    exp = probe_yaml(
        tmp_path, max_steps=steps, checkpoint_every_n_steps=every, val_check_interval=1000, accumulate_grad_batches=2
    )
    cmd = [sys.executable, "-m", "firm", "run", str(exp)]
    subprocess.run([*cmd, "name=reference"], env=subprocess_env, check=True, capture_output=True, timeout=300)
    reference = load_file(str(next((tmp_path / "runs" / "reference").iterdir()) / "weights_rank0.safetensors"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    slurm_env = dict(subprocess_env, SLURM_JOB_ID="4242", PATH=f"{bin_dir}{os.pathsep}{subprocess_env.get('PATH', '')}")

    for sig, env in ((signal.SIGTERM, subprocess_env), (signal.SIGUSR1, slurm_env)):
        name = f"probe_{sig.name.lower()}"
        proc = subprocess.Popen(
            [*cmd, f"name={name}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        deadline, first = time.time() + 120, None
        while time.time() < deadline and proc.poll() is None:
            first = next(iter((tmp_path / "runs" / name).glob("*/checkpoints/step*.ckpt")), None)
            if first is not None:
                break
            time.sleep(0.02)
        assert first is not None, "no periodic checkpoint appeared"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
        run_dir = first.parent.parent
        last = run_dir / "checkpoints" / "last.ckpt"
        state = torch.load(last, weights_only=True)
        stopped_at = state["global_step"]
        batches = state["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"]
        # saved inside the hook of batch `batches + 1` (the counter moves after the hook): the end of an optimizer step,
        # never between its two micro-batches
        assert batches + 1 == 2 * stopped_at
        assert proc.returncode == 143, out + err
        assert f"stopped by {sig.name} after step {stopped_at}" in err, err
        assert f"firm run --resume {run_dir}" in err
        assert every <= stopped_at < steps, "the run finished before the signal; make it longer"

        if sig == signal.SIGTERM:
            again_cmd, again_env = [sys.executable, "-m", "firm", "run", "--resume", str(run_dir)], env
        else:  # SLURM runs the batch script again: the same command, SLURM_RESTART_COUNT=1
            assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
            assert "requeued SLURM job 4242" in err
            again_cmd, again_env = [*cmd, f"name={name}"], dict(env, SLURM_RESTART_COUNT="1")
            # the requeued job's lines find their own runs: the same resolved config, not another line's
            from firm.runner import requeued_slurm_run

            monkeypatch.setenv("SLURM_JOB_ID", "4242")
            monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
            where = types.SimpleNamespace(output_root=str(tmp_path / "runs"), name=name)
            digest = json.loads((run_dir / "meta.json").read_text())["config_sha256"]
            assert requeued_slurm_run(where, digest) == run_dir
            assert requeued_slurm_run(where, "0" * 64) is None
        again = subprocess.run(again_cmd, env=again_env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "resuming from" in again.stdout
        assert [p.name for p in (tmp_path / "runs" / name).iterdir()] == [run_dir.name]  # no second run started
        resumed = [int(r["step"]) for r in read_metrics(run_dir, 1) if r.get("train/loss")]
        assert min(resumed) >= stopped_at  # continued where the signal stopped it
        weights = load_file(str(run_dir / "weights_rank0.safetensors"))
        for k in reference:
            torch.testing.assert_close(weights[k], reference[k], rtol=1e-5, atol=1e-6)
        if sig == signal.SIGUSR1:  # finished: a later requeue of the job starts it afresh instead
            assert (run_dir / "finished.json").is_file() and requeued_slurm_run(where, digest) is None


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text(TOY.read_text().replace("${data.in_dim}", "8"))
    from firm.config import ConfigError

    with pytest.raises(ConfigError, match="no checkpoint"):
        run(None, resume=str(tmp_path / "r"))


@pytest.mark.slow
def test_ddp_two_cpu_processes_end_with_identical_weights(tmp_path, subprocess_env):
    # A NaN loss on rank 1 only, at step 3: both ranks must skip that step together and stay in sync.
    exp = probe_yaml(tmp_path, strategy="ddp", devices=2, accelerator="cpu", max_steps=15, val_check_interval=1000)
    out = subprocess.run(
        [sys.executable, "-m", "firm", "run", str(exp), "module.nan_at_step=3", "module.nan_rank=1"],
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dirs = list((tmp_path / "runs" / "probe").iterdir())
    assert len(run_dirs) == 1, "both ranks must share one run directory"
    run_dir = run_dirs[0]
    assert "distributed_backend=gloo" in out.stdout + out.stderr
    w0 = load_file(str(run_dir / "weights_rank0.safetensors"))
    w1 = load_file(str(run_dir / "weights_rank1.safetensors"))
    init = load_file(str(run_dir / "init_rank0.safetensors"))
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 15
    assert ckpt["firm_skipped_nonfinite"] == 1
    for k in w0:
        assert torch.isfinite(w0[k]).all(), k
        assert torch.equal(w0[k], w1[k]), k
    assert any(not torch.equal(w0[k], init[k]) for k in w0), "weights did not move"


def test_checkpoint_io_refuses_nan_optimizer_state(tmp_path):
    io = _checkpoint_io()
    state = {
        "state_dict": {"w": torch.ones(2)},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.tensor([0.0, float("inf")])}}}],
    }
    with pytest.raises(NonFiniteWeightsError, match="exp_avg"):
        io.save_checkpoint(state, tmp_path / "x.ckpt")


def test_run_dir_under_external_launchers(monkeypatch, tmp_path):
    from firm.config import ConfigError, load_experiment, to_object
    from firm.runner import new_run_dir

    cfg = to_object(load_experiment(TOY, [f"output_root={tmp_path}"]))
    for var in ("FIRM_RUN_DIR", "SLURM_JOB_ID", "SLURM_NTASKS", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert new_run_dir(cfg) == tmp_path / "toy_regression" / "job-4242"
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.delenv("SLURM_NTASKS")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "myjob")
    assert new_run_dir(cfg) == tmp_path / "toy_regression" / "job-myjob"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    with pytest.raises(ConfigError, match="rdzv-id"):
        new_run_dir(cfg)
    monkeypatch.setenv("FIRM_RUN_DIR", str(tmp_path / "chosen"))
    assert new_run_dir(cfg) == tmp_path / "chosen"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_resume_from_a_truncated_last_ckpt_falls_back_to_the_newest_readable_step(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FIRM_RUN_DIR", raising=False)
    first = [f"output_root={tmp_path}", "trainer.max_steps=30", "trainer.checkpoint_every_n_steps=10"]
    first += ["trainer.keep_checkpoints=-1", "trainer.enable_progress_bar=false", "trainer.val_check_interval=1000"]
    run_dir = run(str(TOY), first)
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step*.ckpt")) == [f"step00000{s}0.ckpt" for s in (1, 2, 3)]
    _truncate(ckpts / "last.ckpt")
    _truncate(ckpts / "step0000030.ckpt")
    capsys.readouterr()
    monkeypatch.delenv("FIRM_RUN_DIR", raising=False)
    run(None, ["trainer.max_steps=40"], resume=str(run_dir))  # raised a bare OSError before
    err = capsys.readouterr().err
    assert f"checkpoint {ckpts / 'last.ckpt'} is unreadable" in err
    assert "step0000030.ckpt is unreadable too" in err
    assert "falling back to step0000020.ckpt, the newest readable step checkpoint" in err
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 40
    resumed_steps = [int(r["step"]) for r in read_metrics(run_dir, 1) if r.get("train/loss")]
    assert resumed_steps and min(resumed_steps) >= 20  # continued from step 20, did not start over
    meta = sorted(run_dir.glob("meta.resume-*.json"))
    assert meta and "step0000020.ckpt" in meta[-1].read_text()


def test_resume_with_no_readable_checkpoint_names_the_file(tmp_path):
    from firm.config import ConfigError

    ckpts = tmp_path / "r" / "checkpoints"
    ckpts.mkdir(parents=True)
    (tmp_path / "r" / "config.yaml").write_text(TOY.read_text().replace("${data.in_dim}", "8"))
    (ckpts / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    (ckpts / "step0000010.ckpt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"cannot read checkpoint .*last\.ckpt .* or the 1 step checkpoint"):
        run(None, resume=str(tmp_path / "r"))


def test_checkpoint_io_names_an_unreadable_file(tmp_path):
    from firm.runner import CheckpointError

    (tmp_path / "bad.ckpt").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="bad.ckpt"):
        _checkpoint_io().load_checkpoint(tmp_path / "bad.ckpt")


@pytest.mark.parametrize("override", ["trainer.checkpoint_every_n_steps=0", "trainer.accumulate_grad_batches=0"])
def test_a_run_that_fails_validation_creates_no_run_directory(tmp_path, monkeypatch, override):
    from firm.config import ConfigError

    monkeypatch.delenv("FIRM_RUN_DIR", raising=False)
    with pytest.raises(ConfigError, match="invalid value"):
        run(str(TOY), [f"output_root={tmp_path / 'runs'}", override])
    assert not (tmp_path / "runs").exists()  # left an empty run directory behind before
