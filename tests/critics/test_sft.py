"""CriticSFTModule: answer-only loss and label masking, prompt extraction for validation generation, the schedule."""

import math

import pytest
import torch

from firm.critics.sft import (
    IGNORE_INDEX,
    answer_only_loss,
    answer_positions,
    kept_answer_loss,
    prompt_batch,
    warmup_cosine,
)
from firm.paths import experiments_root


def _batch():
    # Row 0: right-padded, prompt 4 tokens, answer 3; row 1: left-padded, prompt 3 tokens, answer 2.
    input_ids = torch.tensor([[11, 12, 13, 14, 21, 22, 23, 0], [0, 0, 0, 15, 16, 17, 24, 25]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1, 1, 1]])
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[0, 4:7] = input_ids[0, 4:7]
    labels[1, 6:8] = input_ids[1, 6:8]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def test_answer_positions_are_shifted_by_one():
    keep = answer_positions(_batch()["labels"])
    assert keep[0].nonzero().flatten().tolist() == [3, 4, 5]  # positions 3..5 predict answer tokens 4..6
    assert keep[1].nonzero().flatten().tolist() == [5, 6]


def test_answer_only_loss_counts_only_answer_tokens():
    torch.manual_seed(0)
    b = _batch()
    logits = torch.randn(2, 8, 30, requires_grad=True)
    loss, n = answer_only_loss(logits, b["labels"])
    assert n == 5
    # By hand: mean of -log softmax at the 5 (position, target) pairs.
    logp = logits.log_softmax(-1)
    pairs = [(0, 3, 21), (0, 4, 22), (0, 5, 23), (1, 5, 24), (1, 6, 25)]
    manual = -sum(logp[r, t, y] for r, t, y in pairs) / 5
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)
    # Label masking: prompt, image and padding positions get no gradient at all.
    loss.backward()
    touched = logits.grad.abs().sum(-1) > 0  # (B, L)
    assert touched.nonzero().tolist() == [[r, t] for r, t, _ in pairs]
    # Logits computed only at the kept positions give the same loss.
    keep = answer_positions(b["labels"])
    kept, n2 = kept_answer_loss(logits.detach()[keep], b["labels"], keep)
    assert n2 == 5 and kept.item() == pytest.approx(loss.item(), rel=1e-6)


def test_prompt_batch_left_pads_the_prompt_part():
    b = _batch()
    b["mm_token_type_ids"] = torch.tensor([[0, 1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0, 0]])
    b["pixel_values"] = torch.ones(3, 4)
    inputs, starts = prompt_batch(b, pad_id=0)
    assert starts == [4, 6]
    assert inputs["input_ids"].tolist() == [[11, 12, 13, 14], [0, 15, 16, 17]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert inputs["mm_token_type_ids"].tolist() == [[0, 1, 1, 0], [0, 0, 1, 0]]
    assert inputs["pixel_values"] is b["pixel_values"]


def test_warmup_cosine():
    f = warmup_cosine(total_steps=100, warmup_steps=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0, abs=1e-12)
    g = warmup_cosine(total_steps=10, warmup_steps=0, min_ratio=0.1)
    assert g(0) == pytest.approx(1.0) and g(10) == pytest.approx(0.1)
    assert all(0 <= f(s) <= 1 for s in range(120)) and not math.isnan(f(1000))


# --------------------------------------------------------------------------------------------------------------------
# With a tiny Qwen3-VL critic and shapes-world SFT shards (built locally, no downloads)


def _curate(yaml, out, name, *overrides):
    from firm.curation.runner import load_curation, run_curation

    common = ["source.split=train", "source.size=32", "progress=false", f"output_dir={out}", "balance.enabled=false"]
    run_curation(load_curation(str(experiments_root() / f"curation/{yaml}"), [f"name={name}", *common, *overrides]))
    return out / name / "scored"


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A tiny Qwen3-VL critic and shards curated from the shapes world (the pipelines of `firm curate`)."""
    from firm.synthetic.tiny_critic import TinyCriticConfig, build_tiny_critic

    root = tmp_path_factory.mktemp("sft")
    small = TinyCriticConfig(hidden_size=32, layers=1, heads=2, kv_heads=1, vision_depth=1, vision_hidden=32,
                             vocab_size=500, corpus_samples=20)  # fmt: skip
    model = build_tiny_critic(root / "tiny-critic", small)
    cur = root / "curation"
    train = [_curate("shapes_edit_tiny.yaml", cur, "e", "source.count=12"),
             _curate("shapes_gen_tiny.yaml", cur, "g", "source.count=6", "quality=false")]  # fmt: skip
    val = [_curate("shapes_edit_tiny.yaml", cur, "ev", "source.count=4", "source.start=900000")]
    return model, {"train": "::".join(map(str, train)), "val": "::".join(map(str, val))}


def _overrides(model, shards, tmp_path, *extra):
    return [
        f"module.model={model}", f"data.train_shards={shards['train']}", f"data.val_shards={shards['val']}",
        f"output_root={tmp_path}", "data.num_workers=0", "data.batch_size=4", *extra,
    ]  # fmt: skip


def _sft_batch(model, shards):
    from firm.critics.sft_data import CriticSFTDataModule

    dm = CriticSFTDataModule(
        CriticSFTDataModule.Config(
            train_shards=shards["train"], processor=str(model), batch_size=3, num_workers=0,
            judgements=["execution", "consistency", "instruction"],
        )
    )  # fmt: skip
    dm.setup()
    return next(iter(dm.train_dataloader()))


def test_sft_step_loss_is_the_answer_only_loss_of_the_model(tiny_setup):
    from firm.critics.sft import MODEL_INPUTS, CriticSFTModule

    model_dir, shards = tiny_setup
    module = CriticSFTModule(CriticSFTModule.Config(model=str(model_dir), gradient_checkpointing=False))
    module.configure_model()
    batch = _sft_batch(model_dir, shards)
    labels = batch["labels"]
    assert (labels != IGNORE_INDEX).any() and (labels == IGNORE_INDEX).any()
    loss, n = module.answer_loss(batch)
    assert n == int((labels[:, 1:] != IGNORE_INDEX).sum())
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    full = module.model(**inputs, use_cache=False).logits  # (B, L, V)
    ref, _ = answer_only_loss(full, labels)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4)
    # transformers' own causal-LM loss with the same labels agrees: only answer tokens count.
    assert loss.item() == pytest.approx(module.model(**inputs, labels=labels).loss.item(), rel=1e-4)
    # Changing what a prompt token is labelled as (it is masked) changes nothing; unmasking it does.
    prompt_pos = int((labels[0] == IGNORE_INDEX).nonzero()[5])
    relabelled = dict(batch, labels=labels.clone())
    relabelled["labels"][0, prompt_pos] = IGNORE_INDEX
    assert module.answer_loss(relabelled)[0].item() == pytest.approx(loss.item(), rel=1e-6)
    relabelled["labels"][0, prompt_pos] = batch["input_ids"][0, prompt_pos]
    assert module.answer_loss(relabelled)[1] == n + 1


def test_fsdp_wraps_decoder_layers_and_vision_blocks(tiny_setup):
    from lightning.pytorch.strategies import ModelParallelStrategy

    from firm.config import TrainerConfig
    from firm.critics.sft import CriticSFTModule
    from firm.runner import build_strategy

    module = CriticSFTModule(CriticSFTModule.Config(model=str(tiny_setup[0])))
    assert {c.__name__ for c in module.fsdp_wrap_modules} == {"Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock"}
    assert module.model is None  # the policy needs no weights
    for name in ("fsdp2", "fsdp"):  # `fsdp` is an alias of FSDP2
        strategy = build_strategy(TrainerConfig(strategy=name), module)
        assert isinstance(strategy, ModelParallelStrategy) and strategy.reshard_after_forward


@pytest.mark.slow
def test_train_validate_export_and_serve(tiny_setup, tmp_path, monkeypatch):
    import csv

    from firm.critics.export import export_critic
    from firm.critics.local import LocalCritic
    from firm.critics.types import EditRequest
    from firm.runner import run

    model_dir, shards = tiny_setup
    monkeypatch.setenv("FIRM_RUN_DIR", str(tmp_path / "run"))
    run_dir = run(
        str(experiments_root() / "critic/tiny_shapes_cpu.yaml"),
        _overrides(
            model_dir, shards, tmp_path, "trainer.max_steps=4", "trainer.val_check_interval=4",
            "trainer.limit_val_batches=1", "module.val_generate_batches=1", "module.val_max_new_tokens=6",
            "trainer.checkpoint_every_n_steps=4", "trainer.log_every_n_steps=1",
        ),
    )  # fmt: skip
    rows = list(csv.DictReader(open(run_dir / "csv" / "version_0" / "metrics.csv")))
    assert any(r.get("train/loss") for r in rows) and any(r.get("val/loss") for r in rows)
    assert any(r.get("val/parse_rate") for r in rows)  # 0.0 after 4 steps, but measured
    gens = list((run_dir / "val_generations").glob("*.jsonl"))
    assert gens and '"reference_score"' in gens[0].read_text()

    out = export_critic(run_dir, tmp_path / "exported")
    for f in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "firm_export.json"):
        assert (out / f).is_file(), f
    critic = LocalCritic(LocalCritic.Config(model=str(out), max_new_tokens=4))
    from PIL import Image

    src, out_img = Image.new("RGB", (32, 32), "white"), Image.new("RGB", (32, 32), "red")
    res = critic.score([EditRequest(src, out_img, "add a red circle", key="k")])
    assert res[0].key == "k" and set(res[0].scores) == {"execution", "consistency"}
    # `firm critic bench` runs the exported critic like any other (a 4-token budget: its answers are unparseable, and
    # counted).
    from firm.bench.run import load_bench_config, run_bench
    from firm.synthetic.bench import build_shapes_bench

    bench = build_shapes_bench(tmp_path / "bench", n_per_task=1, size=32)
    cfg = load_bench_config(
        None, ["critic.max_new_tokens=4", f"critic.model={out}", f"output_root={tmp_path}", "plot=false"],
        data=str(bench), critics=["local"],
    )  # fmt: skip
    overall = run_bench(cfg, progress=False, echo=False)["critics"]["local"]["metrics"]["groups"]["overall"]
    assert overall["n_items"] == 3 and overall["n_parsed"] + overall["n_failed"] == 3
    # The exported weights are the trained ones, not the initial ones.
    from safetensors.torch import load_file

    trained, initial = load_file(out / "model.safetensors"), load_file(model_dir / "model.safetensors")
    name = next(k for k in initial if "layers.0.self_attn.q_proj" in k)
    assert not torch.equal(trained[name], initial[name])


@pytest.mark.slow
def test_lora_checkpoint_keeps_only_adapters_and_export_merges(tiny_setup, tmp_path):
    from safetensors.torch import load_file

    from firm.config import load_experiment, save_config, to_object
    from firm.critics.export import export_critic
    from firm.critics.sft import CriticSFTModule

    model_dir, shards = tiny_setup
    extra = ["module.finetune=lora", "module.lora_r=4", "module.lora_alpha=8", "module.gradient_checkpointing=true"]
    node = load_experiment(
        str(experiments_root() / "critic/tiny_shapes_cpu.yaml"), _overrides(model_dir, shards, tmp_path, *extra)
    )
    module = CriticSFTModule(to_object(node).module)
    module.configure_model()
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=0.05)
    for _ in range(2):  # lora_B starts at zero: two steps make the merged delta non-zero
        loss, _ = module.answer_loss(_sft_batch(model_dir, shards))
        loss.backward()
        opt.step()
        opt.zero_grad()
    ckpt = {"state_dict": module.state_dict(), "global_step": 2}
    module.on_save_checkpoint(ckpt)
    assert set(ckpt["state_dict"]) == set(trainable)
    run_dir = tmp_path / "run"
    save_config(node, run_dir / "config.yaml")
    (run_dir / "checkpoints").mkdir()
    torch.save(ckpt, run_dir / "checkpoints" / "last.ckpt")
    out = export_critic(run_dir, tmp_path / "merged")
    merged, base = load_file(out / "model.safetensors"), load_file(model_dir / "model.safetensors")
    assert not any("lora" in k for k in merged)
    name = next(k for k in base if "layers.0.self_attn.q_proj.weight" in k)
    assert not torch.equal(merged[name], base[name])
    # A checkpoint of another model is refused with a clear error.
    torch.save({"state_dict": {"model.nonsense.weight": torch.zeros(1)}}, run_dir / "checkpoints" / "last.ckpt")
    from firm.config import ConfigError

    with pytest.raises(ConfigError, match="do not fit the model|missing"):
        export_critic(run_dir, tmp_path / "bad")


@pytest.mark.slow
def test_fsdp2_trains_the_critic_ddp_trains(tiny_setup, tmp_path, subprocess_env):
    """2 processes (gloo): FSDP2 (decoder layers and vision blocks sharded) and DDP give the same weights."""
    import subprocess
    import sys

    model_dir, shards = tiny_setup
    runs = {}
    for strategy in ("ddp", "fsdp2"):
        args = _overrides(
            model_dir, shards, tmp_path, "trainer.max_steps=2", "trainer.limit_val_batches=0", "trainer.devices=2",
            "trainer.accelerator=cpu", f"trainer.strategy={strategy}", f"name={strategy}",
            "trainer.checkpoint_every_n_steps=2", "module.lr=1e-3",
        )  # fmt: skip
        exp = str(experiments_root() / "critic/tiny_shapes_cpu.yaml")
        out = subprocess.run(
            [sys.executable, "-m", "firm", "run", exp, *args], env=subprocess_env, capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
        (run_dir,) = list((tmp_path / strategy).iterdir())
        runs[strategy] = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    a, b = runs["fsdp2"], runs["ddp"]
    assert a.keys() == b.keys() and a
    from safetensors.torch import load_file

    initial = load_file(model_dir / "model.safetensors")
    name = next(k for k in a if "layers.0.self_attn.q_proj.weight" in k)
    moved = (b[name] - initial[name.removeprefix("model.")].to(b[name].dtype)).abs().max()
    assert moved > 1e-4, moved  # it trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
