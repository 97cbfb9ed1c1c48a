"""The smaller breaks found by running FIRM against vLLM and the openai client: each pinned by a test."""

import json
import shutil

import pytest

from firm.cli import main
from tests.conftest import REPO


def _cli(args):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code


@pytest.mark.parametrize(
    "yaml, command",
    [("curation/edit_vllm.yaml", "firm curate"), ("bench/shapes_rule.yaml", "firm critic bench")],
)
def test_firm_run_on_another_commands_yaml_names_that_command(yaml, command, capsys):
    path = REPO / "experiments" / yaml
    assert _cli(["run", path]) == 2
    err = capsys.readouterr().err
    assert f"run it with `{command} {path}`" in err and "missing required section" not in err


def test_run_yaml_then_resume_with_an_override_continues_the_newest_run(tmp_path, monkeypatch):
    """`firm run X.yaml --resume trainer.max_steps=N`: argparse gives the override to --resume; it is an override."""
    monkeypatch.delenv("FIRM_RUN_DIR", raising=False)
    yaml = REPO / "experiments" / "demo" / "toy_regression.yaml"
    common = [f"output_root={tmp_path}", "trainer.log_every_n_steps=1", "trainer.val_check_interval=2"]
    assert _cli(["run", yaml, "trainer.max_steps=2", "trainer.checkpoint_every_n_steps=2", *common]) == 0
    [run_dir] = (tmp_path / "toy_regression").iterdir()
    assert _cli(["run", yaml, "--resume", "trainer.max_steps=4", *common]) == 0
    assert [p.name for p in (tmp_path / "toy_regression").iterdir()] == [run_dir.name]  # resumed, not a new run
    import torch

    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 4


def test_tiny_critic_has_a_head_dim_vllm_serves(tmp_path):
    from firm.synthetic.tiny_critic import VLLM_HEAD_DIMS, TinyCriticConfig

    assert TinyCriticConfig().head_dim in VLLM_HEAD_DIMS and 24 not in VLLM_HEAD_DIMS
    with pytest.raises(ValueError, match="head_dim 24 is not served by vLLM"):
        TinyCriticConfig(head_dim=24)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        TinyCriticConfig(heads=3, kv_heads=2)


def test_export_layout_matches_the_hub_and_still_loads(tiny_vlm, tmp_path):
    from firm.critics.export import complete_processor_layout, save_processor
    from firm.critics.local import LocalCritic

    out = tmp_path / "out"
    out.mkdir()
    for f in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(tiny_vlm / f, out / f)
    save_processor(tiny_vlm, out, "qwen3_vl")
    image = json.loads((out / "preprocessor_config.json").read_text())
    video = json.loads((out / "video_preprocessor_config.json").read_text())
    tok = json.loads((out / "tokenizer_config.json").read_text())
    assert image["processor_class"] == video["processor_class"] == tok["processor_class"] == "Qwen3VLProcessor"
    assert video["video_processor_type"] == "Qwen3VLVideoProcessor"
    assert {k: video[k] for k in ("patch_size", "merge_size", "temporal_patch_size")} == {
        k: image[k] for k in ("patch_size", "merge_size", "temporal_patch_size")
    }
    template = json.loads((out / "chat_template.json").read_text())["chat_template"]
    assert template == (out / "chat_template.jinja").read_text()
    assert complete_processor_layout(tiny_vlm, out, "qwen3_vl") == []  # nothing left to write
    critic = LocalCritic(LocalCritic.Config(model=str(out), max_new_tokens=2))
    assert critic.tokenizer.chat_template == template


def test_a_critic_named_by_hub_id_loads_from_the_hub_cache(tiny_vlm, tmp_path, monkeypatch):
    """`model: org/name` goes through huggingface_hub's snapshot_download (here offline, from a filled cache)."""
    from firm.critics.local import LocalCritic, critic_checkpoint

    cache = tmp_path / "hub"
    repo = cache / "models--firm-test--tiny-critic"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_vlm, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    path = critic_checkpoint("firm-test/tiny-critic")
    assert path == repo / "snapshots" / commit
    critic = LocalCritic(LocalCritic.Config(model="firm-test/tiny-critic", max_new_tokens=2))
    assert critic.tokenizer is not None
    with pytest.raises(FileNotFoundError, match="not a directory \\(nor a hub id"):
        critic_checkpoint(str(tmp_path / "missing" / "dir"))
    with pytest.raises(FileNotFoundError, match="hub id firm-test/absent could not be fetched"):
        critic_checkpoint("firm-test/absent")  # not in the cache, and offline
