"""Shipped RL experiments end to end: tiny runs, LoRA export into diffusers, 2-process DDP, SIGKILL + resume."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from firm import kernels
from firm.config import load_experiment, to_object
from firm.policies.export import export_lora
from firm.policies.policy import FlowPolicy, build_tiny_components
from firm.runner import run
from tests.helpers.procs import kill_at_first_checkpoint

REPO = Path(__file__).resolve().parents[2]
RL = REPO / "experiments" / "rl"
HELPERS = REPO / "tests" / "helpers"


def metrics(run_dir: Path, version: int = 0) -> list[dict[str, str]]:
    with open(run_dir / "csv" / f"version_{version}" / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("reward/mean")]


def test_full_size_experiments_validate_without_loading_weights():
    for name, family, algo in [
        ("firm_sd35_qma", "sd3", "diffusion_nft"),
        ("firm_sd35_qma_grpo", "sd3", "flow_grpo"),
        ("firm_sd35_qma_mixgrpo", "sd3", "mix_grpo"),
        ("firm_sd35_qma_grpo_guard", "sd3", "grpo_guard"),
        ("firm_qwen_edit_cme", "qwen_image_edit", "diffusion_nft"),
        ("firm_qwen_edit_2511_cme", "qwen_image_edit", "diffusion_nft"),
    ]:
        cfg = to_object(load_experiment(RL / f"{name}.yaml"))
        m = cfg.module
        m.validate()
        grpo_family = algo != "diffusion_nft"
        assert (m.name, m.policy.family, m.critic.name) == (algo, family, "http")
        assert m.policy.lora.rank == 32 and m.policy.lora.alpha == 64 and m.policy.resolution == 512
        assert m.kl_beta == (0.04 if grpo_family else 1e-4) and m.adv_clip_max == 5.0
        assert cfg.trainer.strategy in ("ddp", "fsdp2") and 12 <= cfg.data.group_size <= 16
        # the official configs' settings: batch-std advantages, EMA 0.9, 0.99 of the steps (MixGRPO: its window)
        assert m.adv_scale == "batch" and m.ema_decay == 0.9 and m.ema_warmup
        assert m.timestep_fraction == (1.0 if algo == "mix_grpo" else 0.99)
        steps = {"qwen_image_edit": 6}.get(family, 25 if algo == "mix_grpo" else 10)
        assert m.sampler.num_steps == steps
        if grpo_family:
            assert m.kl_form == "flow_grpo" and m.drop_zero_adv and m.clip_range == 1e-4
        else:
            assert m.old_decay_unit == "optimizer_step" and (m.old_decay_rate, m.old_decay_max) == (0.001, 0.5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,steps,pipeline",
    [
        ("tiny_sd3_nft", 2, "StableDiffusion3Pipeline"),
        ("tiny_sd3_grpo", 2, None),
        ("tiny_qwen_edit_nft", 1, "QwenImageEditPlusPipeline"),
    ],
)
def test_tiny_experiment_runs_and_exports_a_diffusers_lora(tmp_path, monkeypatch, name, steps, pipeline):
    monkeypatch.delenv("FIRM_RUN_DIR", raising=False)
    overrides = [f"output_root={tmp_path}", f"trainer.max_steps={steps}"]
    if name == "tiny_sd3_nft":
        overrides.append("module.ema_decay=0.5")
    else:
        overrides.append("module.ema_decay=null")  # the full YAMLs keep an EMA; check the error without one
    run_dir = run(str(RL / f"{name}.yaml"), overrides)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == steps and ckpt["firm_rl"]["rl_step"] >= 1
    assert all("lora_" in k for k in ckpt["state_dict"])  # adapters only: no frozen base weights
    rows = metrics(run_dir)
    assert rows and all(r["reward/missing_frac"] == "0.0" for r in rows)
    assert list((run_dir / "samples").glob("*.png")) and list((run_dir / "tb" / "version_0").iterdir())
    if pipeline is None:
        return
    # export, load with diffusers' load_lora_weights, and compare with the trained policy
    out = export_lora(run_dir, tmp_path / "lora")
    assert out.name == "pytorch_lora_weights.safetensors"
    cfg = to_object(load_experiment(run_dir / "config.yaml"))
    import diffusers

    comps = build_tiny_components(cfg.module.policy)
    kwargs = {"transformer": comps["transformer"], "scheduler": comps["scheduler"], "vae": None}
    if pipeline == "StableDiffusion3Pipeline":
        kwargs.update({k: None for k in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")})
        kwargs.update(text_encoder_3=None, tokenizer_3=None)
    else:
        kwargs.update(text_encoder=None, tokenizer=None, processor=None)
    pipe = getattr(diffusers, pipeline)(**kwargs)
    pipe.load_lora_weights(str(out.parent))
    policy = FlowPolicy(cfg.module.policy, old_adapter=True)
    sd = {k.removeprefix("policy."): v for k, v in ckpt["state_dict"].items()}
    assert not policy.load_state_dict(sd, strict=False).unexpected_keys
    from PIL import Image

    imgs = [Image.new("RGB", (32, 32), (250, 250, 250))] * 2 if policy.family.task == "edit" else None
    cond = policy.encode_prompts(["a red circle at the top", "a blue square"], imgs)
    x, s = torch.randn(2, *policy.latent_shape()), torch.tensor([0.7, 0.3])
    ours = policy.velocity(x, s, cond)
    pipe.transformer.eval()
    with torch.no_grad():
        theirs = policy.family.forward(pipe.transformer, x, s, cond)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)
    if name == "tiny_sd3_nft":  # the EMA export differs from the raw weights, the `old` adapter export works too
        ema = load_file(str(export_lora(run_dir, tmp_path / "ema", ema=True)))
        raw = load_file(str(out))
        assert ema.keys() == raw.keys() and any(not torch.equal(ema[k], raw[k]) for k in raw)
        assert load_file(str(export_lora(run_dir, tmp_path / "old", adapter="old"))).keys() == raw.keys()
    else:
        with pytest.raises(ValueError, match="no EMA"):
            export_lora(run_dir, tmp_path / "ema", ema=True)


def test_export_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        export_lora(tmp_path, tmp_path / "out")


def probe_yaml(tmp_path: Path, **trainer) -> Path:
    lines = "".join(f"  {k}: {v}\n" for k, v in trainer.items())
    path = tmp_path / "probe.yaml"
    path.write_text(
        f"base: {RL / 'tiny_sd3_nft.yaml'}\nname: probe\noutput_root: {tmp_path / 'runs'}\n"
        f"imports: [{HELPERS / 'rl_probe.py'}]\n"
        "module:\n  name: probe_nft\n  critic: {name: image_stats}\n  lr: 0.01\n  log_images_every: 0\n"
        "  num_threads: 1\n"
        "  policy: {resolution: 16}\n  sampler: {num_steps: 3}\n"
        "data:\n  prompts: [a red circle, a blue square at the top, green triangle]\n"  # 3 steps per epoch
        f"  batch_size: 4\n  group_size: 4\ntrainer:\n  enable_progress_bar: false\n{lines}"
    )
    return path


@pytest.mark.slow
def test_ddp_group_statistics_across_ranks_equal_single_process_statistics(tmp_path, subprocess_env):
    exp = probe_yaml(tmp_path, strategy="ddp", devices=2, max_steps=2, checkpoint_every_n_steps=100)
    out = subprocess.run(
        [sys.executable, "-m", "firm", "run", str(exp)], env=subprocess_env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run_dir,) = list((tmp_path / "runs" / "probe").iterdir())
    probe = run_dir / "probe"
    split_groups = 0
    for step in range(2):
        ranks = [torch.load(probe / f"adv_step{step}_rank{r}.pt", weights_only=True) for r in range(2)]
        rewards = torch.cat([r["rewards"] for r in ranks])
        groups = torch.cat([r["groups"] for r in ranks])
        # one process, all the data (the YAML's batch std: the std of every rank's rewards, so it needs them all)
        single = kernels.group_advantages(rewards, groups, scale="batch", clip=5.0, eps=1e-4)
        torch.testing.assert_close(torch.cat([r["adv"] for r in ranks]), single)
        assert single.abs().sum() > 0  # the statistics are not trivially zero
        split_groups += len(set(ranks[0]["groups"].tolist()) & set(ranks[1]["groups"].tolist()))
    assert split_groups > 0, "no group was spread over both ranks: the test would not test anything"
    w0 = load_file(str(probe / "lora_rank0.safetensors"))
    w1 = load_file(str(probe / "lora_rank1.safetensors"))
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k  # gradients were all-reduced: ranks stay identical
    assert any(w0[k].abs().sum() > 0 for k in w0 if "lora_B" in k)  # and they trained


def _rows(run_dir: Path, version: int) -> dict[str, dict[str, str]]:
    """The metrics rows of one launch by step, without the wall-clock perf/* columns."""
    with open(run_dir / "csv" / f"version_{version}" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("reward/mean")]
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith("perf/") and v != ""} for r in rows}


def _assert_resumed_exactly(ref_dir: Path, run_dir: Path, first_step: int) -> None:
    ref, resumed = _rows(ref_dir, 0), _rows(run_dir, 1)
    assert resumed and min(int(s) for s in resumed) == first_step  # continued where the checkpoint was
    for step, row in resumed.items():
        assert row == ref[step], f"step {step}: " + str(
            {k: (v, ref[step].get(k)) for k, v in row.items() if v != ref[step].get(k)}
        )
    a = load_file(str(ref_dir / "probe" / "lora_rank0.safetensors"))
    b = load_file(str(run_dir / "probe" / "lora_rank0.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise
    ck_a = torch.load(ref_dir / "checkpoints" / "last.ckpt", weights_only=True)
    ck_b = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert torch.equal(ck_a["firm_rl"]["rng"]["torch"], ck_b["firm_rl"]["rng"]["torch"])
    for k, v in ck_a["state_dict"].items():  # the old (sampling) adapter too
        assert torch.equal(v, ck_b["state_dict"][k]), k


def _assert_it_learns(ref_dir: Path, steps: int) -> None:
    """The config has a real learning signal: nonzero advantages every step and weights that moved."""
    probe = ref_dir / "probe"
    for step in range(steps):
        rec = torch.load(probe / f"adv_step{step}_rank0.pt", weights_only=True)
        assert rec["adv"].abs().sum() > 0.5, (step, rec["adv"])
    w = load_file(str(probe / "lora_rank0.safetensors"))
    moved = max(float(v.abs().max()) for k, v in w.items() if "lora_B" in k)  # lora_B starts at exactly 0
    assert moved > 1e-3, moved


@pytest.mark.slow
def test_sigkill_then_resume_continues_bitwise_exactly(tmp_path, subprocess_env):
    steps = 4  # killed after the checkpoint at step 2; the resumed steps cross into the second data epoch
    exp = probe_yaml(tmp_path, max_steps=steps, checkpoint_every_n_steps=2)
    cmd = [sys.executable, "-m", "firm", "run", str(exp)]
    subprocess.run([*cmd, "name=reference"], env=subprocess_env, check=True, capture_output=True, timeout=600)
    (ref_dir,) = list((tmp_path / "runs" / "reference").iterdir())
    _assert_it_learns(ref_dir, steps)

    run_dir = kill_at_first_checkpoint(cmd, subprocess_env, tmp_path / "runs" / "probe", steps)
    killed_at = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]

    out = subprocess.run(
        [*cmd[:3], "run", "--resume", str(run_dir)], env=subprocess_env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    _assert_resumed_exactly(ref_dir, run_dir, killed_at)


@pytest.mark.slow
def test_extending_a_finished_run_with_resume_continues_bitwise_exactly(tmp_path, subprocess_env):
    exp = probe_yaml(tmp_path, max_steps=4, checkpoint_every_n_steps=100)
    cmd = [sys.executable, "-m", "firm", "run", str(exp)]
    subprocess.run([*cmd, "name=reference"], env=subprocess_env, check=True, capture_output=True, timeout=600)
    (ref_dir,) = list((tmp_path / "runs" / "reference").iterdir())
    _assert_it_learns(ref_dir, 4)
    # finish a 2-step run in the middle of a data epoch (3 prompts: 3 steps per epoch), then extend it to 4 steps
    subprocess.run([*cmd, "trainer.max_steps=2"], env=subprocess_env, check=True, capture_output=True, timeout=600)
    (run_dir,) = list((tmp_path / "runs" / "probe").iterdir())
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    out = subprocess.run(
        [*cmd[:3], "run", "--resume", str(run_dir), "trainer.max_steps=4"],
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    _assert_resumed_exactly(ref_dir, run_dir, 2)
