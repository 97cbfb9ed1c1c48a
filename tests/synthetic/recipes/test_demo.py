"""The shapes-world demo machinery: tiny base models, pretraining, held-out evaluation, the RL report, the ablation.

The short demo runs use the committed base models with a handful of RL steps: they check that everything runs and
logs every reward component, not that the policy improves (the demo's report shows that).
"""

import csv
import json
from pathlib import Path

import pytest
import torch

from firm.policies.policy import (
    FlowPolicy,
    LoRAConfig,
    PixelCodec,
    PolicyConfig,
    build_tiny_components,
    load_components,
    save_components,
)
from firm.runner import run
from firm.synthetic.critic import ShapesRuleCritic
from firm.synthetic.evaluate import evaluate_policy
from firm.synthetic.recipes.demo import ShapesPromptDataModule, compare
from firm.synthetic.recipes.pretrain import shapes_tiny_config
from firm.synthetic.tasks import SplitConfig, edit_tasks, split_of
from firm.synthetic.world import WorldConfig, render

REPO = Path(__file__).resolve().parents[3]
DEMO = REPO / "experiments" / "demo"
CHECKPOINTS = REPO / "firm" / "synthetic" / "checkpoints"
WORLD = WorldConfig(size=32, colours=["red", "green", "blue", "yellow"], shapes=["circle", "square", "triangle"])


def read_metrics(run_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return rows


def tiny_editor(tmp_path: Path, **tiny) -> Path:
    """A random tiny editor of the demo's architecture (smaller), saved like a real checkpoint."""
    cfg = PolicyConfig(
        family="qwen_image_edit", resolution=32, tiny=shapes_tiny_config(num_layers=1, num_heads=2, **tiny)
    )
    return save_components(build_tiny_components(cfg), tmp_path / "editor")


# --------------------------------------------------------------------------------------------------------------------
# Codec and conditioning (the small firm/policies additions)


def test_pixel_codec_space_to_depth_is_exact_and_saves(tmp_path):
    codec = PixelCodec(2)
    images = torch.rand(3, 3, 32, 32)
    lat = codec.encode(images)
    assert lat.shape == (3, 12, 16, 16) and codec.scale_factor == 2 and codec.channels == 12
    assert torch.allclose(codec.decode(lat), images, atol=1e-6)
    assert torch.equal(
        lat[:, :4], (images * 2 - 1)[:, 0:1].reshape(3, 1, 16, 2, 16, 2).permute(0, 1, 3, 5, 2, 4).reshape(3, 4, 16, 16)
    )  # channel block c holds the 2x2 neighbourhoods of colour c
    codec.save_pretrained(tmp_path / "vae")
    assert PixelCodec.from_pretrained(tmp_path / "vae").patch == 2
    with pytest.raises(ValueError, match="patch"):
        PixelCodec(0)


def test_tiny_editor_conditions_on_the_source_along_channels(tmp_path):
    path = tiny_editor(tmp_path)
    comps = load_components(PolicyConfig(family="qwen_image_edit", pretrained=str(path), resolution=32))
    assert isinstance(comps["codec"], PixelCodec) and comps["codec"].patch == 2
    assert comps["transformer"].config.in_channels == 2 * 4 * 12  # noisy target + source, 2x2 packed
    policy = FlowPolicy(
        PolicyConfig(family="qwen_image_edit", pretrained=str(path), resolution=32, lora=LoRAConfig(rank=2))
    )
    tasks = list(edit_tasks("train", world=WORLD, limit=2))
    src = [render(t.source, WORLD) for t in tasks]
    cond = policy.encode_prompts([tasks[0].instruction] * 2, src)
    assert len(cond.image_latents) == 1 and cond.image_latents[0].shape == (2, 12, 16, 16)  # one source per row
    x = torch.randn(2, 12, 16, 16)
    v = policy.velocity(torch.cat([x[:1], x[:1]]), torch.full((2,), 0.5), cond)
    assert v.shape == (2, 12, 16, 16)
    assert not torch.allclose(v[0], v[1])  # same noise and text, different source -> different velocity
    cond.image_latents = None
    with pytest.raises(ValueError, match="source image along channels"):
        policy.velocity(x, torch.full((2,), 0.5), cond)


# --------------------------------------------------------------------------------------------------------------------
# Evaluation


def test_evaluation_is_paired_and_seeded(tmp_path):
    policy = FlowPolicy(PolicyConfig(family="qwen_image_edit", pretrained=str(tiny_editor(tmp_path)), resolution=32))
    tasks = list(edit_tasks("test", world=WORLD, limit=3))
    critic = ShapesRuleCritic(ShapesRuleCritic.Config(shapes=WORLD.shapes))
    kw = dict(seeds=[0, 1], num_steps=2, critic=critic)
    base = evaluate_policy(policy, tasks, WORLD, adapter=None, **kw)
    # A fresh LoRA adapter is zero: the "trained" policy equals the base, and with shared noise so do its images.
    same = evaluate_policy(policy, tasks, WORLD, adapter="default", **kw)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(base.images, same.images))
    s = compare(base, same)
    assert s["improvement"] == 0.0 and set(s["base"]) == {"reward", "execution", "consistency"}
    assert all(0.0 <= v <= 1.0 for v in s["base"].values())
    assert base.reward.shape == (2, 3) and "lazy_frac" in s
    other = evaluate_policy(policy, tasks, WORLD, adapter=None, seeds=[5], num_steps=2, critic=critic)
    assert any(a.tobytes() != b.tobytes() for a, b in zip(base.images, other.images))


# --------------------------------------------------------------------------------------------------------------------
# Prompts


def test_prompt_datamodule_exports_train_tasks_once(tmp_path):
    cfg = ShapesPromptDataModule.Config(
        task="edit",
        n_prompts=12,
        world=WORLD,
        split=SplitConfig(),
        cache_dir=str(tmp_path),
        group_size=4,
        batch_size=8,
    )
    dm = ShapesPromptDataModule(cfg)
    path = Path(cfg.path)
    assert path.is_file() and len(path.read_text().splitlines()) == 12
    mtime = path.stat().st_mtime_ns
    again = ShapesPromptDataModule(
        ShapesPromptDataModule.Config(
            task="edit", n_prompts=12, world=WORLD, split=SplitConfig(), cache_dir=str(tmp_path)
        )
    )
    assert again.config.path == cfg.path and path.stat().st_mtime_ns == mtime  # reused, not rewritten
    dm.setup()
    keys = {r["key"] for r in dm.dataset.records}
    heldout = {t.key for t in edit_tasks("test", world=WORLD, limit=200)}
    assert keys and not keys & heldout
    tasks = {t.key: t for t in edit_tasks(None, world=WORLD, limit=40)}
    assert all(split_of(tasks[k], SplitConfig(), WORLD) == "train" for k in keys if k in tasks)
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["prompt"]) == 8 and batch["image"][0].size == (32, 32)


# --------------------------------------------------------------------------------------------------------------------
# Pretraining


@pytest.mark.slow
def test_pretraining_runs_exports_and_evaluates(tmp_path, monkeypatch):
    monkeypatch.delenv("FIRM_RUN_DIR", raising=False)
    out = tmp_path / "exported"
    run_dir = run(
        str(DEMO / "pretrain_edit.yaml"),
        [
            f"output_root={tmp_path / 'runs'}",
            "trainer.max_steps=4",
            "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false",
            "module.tiny.num_layers=1",
            "module.tiny.num_heads=2",
            "module.warmup_steps=2",
            "module.eval_every=2",
            "module.eval_tasks=3",
            "module.eval_steps=2",
            f"module.export_dir={out}",
            "data.n_tasks=64",
            "data.batch_size=8",
        ],
    )
    rows = read_metrics(run_dir)
    assert any(r.get("train/loss") for r in rows)
    evals = [r for r in rows if r.get("eval/reward")]
    assert len(evals) == 2  # step 2 and the end
    assert {"eval/execution", "eval/consistency"} <= set(evals[0])
    info = json.loads((out / "pretrain.json").read_text())
    assert info["steps"] == 4 and info["family"] == "qwen_image_edit" and 0 <= info["heldout"]["reward"] <= 1
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "text_encoder" / "model.safetensors").is_file()
    comps = load_components(PolicyConfig(family="qwen_image_edit", pretrained=str(out), resolution=32))
    assert next(comps["transformer"].parameters()).dtype == torch.float32  # saved float16, loaded float32


# --------------------------------------------------------------------------------------------------------------------
# The committed base models and the short demos


@pytest.mark.parametrize("name,family", [("shapes_edit", "qwen_image_edit"), ("shapes_gen", "sd3")])
def test_committed_checkpoints_load(name, family):
    path = CHECKPOINTS / name
    info = json.loads((path / "pretrain.json").read_text())
    assert info["family"] == family and "command" in info and "init_seed" in info
    comps = load_components(PolicyConfig(family=family, pretrained=str(path), resolution=32))
    assert isinstance(comps["codec"], PixelCodec)
    n_bytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert n_bytes < 8e6  # "a few MB"


def _short_demo(yaml: Path, tmp_path: Path, monkeypatch, *extra: str) -> Path:
    monkeypatch.delenv("FIRM_RUN_DIR", raising=False)
    return run(
        str(yaml),
        [
            f"output_root={tmp_path / 'runs'}",
            "trainer.max_steps=2",
            "trainer.enable_progress_bar=false",
            "module.callbacks.shapes_report.n_tasks=4",
            "module.callbacks.shapes_report.seeds=[0,1]",
            "module.callbacks.shapes_report.every=1",
            "module.callbacks.shapes_report.curve_tasks=2",
            "module.callbacks.shapes_report.grid_tasks=2",
            "module.callbacks.shapes_report.progress=false",
            "module.rollout_chunk=8",
            "data.n_prompts=6",
            "data.group_size=4",
            "data.batch_size=8",
            f"data.cache_dir={tmp_path / 'data'}",
            *extra,
        ],
    )


def _check_report(run_dir: Path, components: tuple[str, str]) -> dict:
    rep = run_dir / "report"
    for name in ("report.md", "summary.json", "curves.png", "grid.png"):
        assert (rep / name).is_file(), name
    s = json.loads((rep / "summary.json").read_text())
    for side in ("base", "trained"):
        assert set(s[side]) == {"reward", *components}
        assert all(0.0 <= v <= 1.0 for v in s[side].values())
    assert s["seed_spread"] >= 0 and s["n_tasks"] == 4 and s["seeds"] == [0, 1]
    md = (rep / "report.md").read_text()
    assert "![reward and components](curves.png)" in md and "grid.png" in md
    rows = [r for r in read_metrics(run_dir) if r.get("reward/mean")]
    assert len(rows) == 2
    for key in ("reward/mean", *(f"reward/{c}" for c in components), "perf/rollout_s"):
        assert all(r.get(key) not in (None, "") for r in rows), key
    return s


@pytest.mark.slow
def test_short_edit_demo_runs_and_reports(tmp_path, monkeypatch, capsys):
    run_dir = _short_demo(DEMO / "shapes_edit_cme.yaml", tmp_path, monkeypatch)
    s = _check_report(run_dir, ("execution", "consistency"))
    assert s["trained_on"] == "cme" and "lazy_frac" in s
    rows = [r for r in read_metrics(run_dir) if r.get("reward/mean")]
    assert all(r.get("reward/lazy_editor_frac") not in (None, "") for r in rows)
    assert all(r.get("train/policy") not in (None, "") for r in rows)  # the DiffusionNFT loss
    assert len([r for r in read_metrics(run_dir) if r.get("heldout/reward")]) == 2  # every=1: after each step
    assert f"[shapes] report: {run_dir / 'report' / 'report.md'}" in capsys.readouterr().out


@pytest.mark.slow
def test_short_gen_demo_runs_and_reports(tmp_path, monkeypatch):
    run_dir = _short_demo(DEMO / "shapes_gen_qma.yaml", tmp_path, monkeypatch)
    s = _check_report(run_dir, ("instruction", "quality"))
    assert s["trained_on"] == "qma"


@pytest.mark.slow
def test_ablation_driver_writes_table_and_plot(tmp_path, monkeypatch):
    from firm.synthetic.recipes.ablation import run_ablation

    monkeypatch.delenv("FIRM_RUN_DIR", raising=False)
    overrides = [
        "trainer.max_steps=1",
        "module.callbacks.shapes_report.n_tasks=3",
        "module.callbacks.shapes_report.seeds=[0]",
        "module.rollout_chunk=8",
        "data.n_prompts=4",
        "data.group_size=4",
        "data.batch_size=8",
        f"data.cache_dir={tmp_path / 'data'}",
    ]
    md = run_ablation(
        str(DEMO / "ablation_edit_rewards.yaml"), ["cme", "weighted_sum"], [0], tmp_path / "abl", overrides
    )
    text = md.read_text()
    assert "| base (pretrained) |" in text and "CME = E (0.6 + 0.4 C)" in text and "plain sum 0.5 E + 0.5 C" in text
    assert (tmp_path / "abl" / "ablation.png").is_file()
    result = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert [r["reward"] for r in result["runs"]] == ["cme", "weighted_sum"]
    assert len({r["run_dir"] for r in result["runs"]}) == 2
    assert all(len(r["curves"]["reward/execution"]) == 1 for r in result["runs"])


@pytest.mark.slow
@pytest.mark.parametrize("algorithm,extra", [("flow_grpo", []), ("mix_grpo", ["module.window_size=2"])])
def test_short_edit_demo_with_a_policy_gradient_algorithm(tmp_path, monkeypatch, algorithm, extra):
    # the same report callback serves every algorithm: no per-algorithm report subclass
    run_dir = _short_demo(
        DEMO / "shapes_edit_cme.yaml",
        tmp_path,
        monkeypatch,
        f"module.name={algorithm}",
        "module.sampler.method=sde",
        "module.sampler.noise_level=0.7",
        "module.timestep_fraction=0.5",
        *extra,
    )
    s = _check_report(run_dir, ("execution", "consistency"))
    assert s["algorithm"] == algorithm
    rows = [r for r in read_metrics(run_dir) if r.get("reward/mean")]
    assert all(r.get("train/clip_frac") not in (None, "") for r in rows)
