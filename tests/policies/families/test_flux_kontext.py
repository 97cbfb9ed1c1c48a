"""FLUX.1-Kontext against diffusers' ``FluxKontextPipeline``.

A tiny random checkpoint with the real classes and the hub layout of ``black-forest-labs/FLUX.1-Kontext-dev``
(``model_index.json``; ``CLIPTextModel`` + a byte-level BPE ``CLIPTokenizer`` with CLIP's ``</w>`` word ends and
start / end tokens, padded to 77; ``T5EncoderModel`` + a unigram ``T5TokenizerFast``; a guidance-distilled
``FluxTransformer2DModel``; an 8x ``AutoencoderKL`` with FLUX's latent normalisation; the FLUX scheduler config) is
loaded by FIRM and by the pipeline. The pipeline runs at its default conditioning settings: its ~1 MP preferred
Kontext resolution for the source (a 63x33 source: 1248x832, 4056 source tokens), 512 T5 tokens, embedded guidance 3.5,
no true CFG; ``max_area`` is set to the output's area only because the pipeline otherwise renders at 1 MP whatever
``height`` / ``width`` say. With the same initial latents and steps, FIRM's sampling equals the pipeline's with the
second CFG pass off and on and at another embedded guidance, the decoded images agree, and a LoRA trained by a real RL
run and exported by FIRM reproduces the trained policy inside the pipeline. Run with ``-s`` to see the numbers. The
embeddings, sampling and LoRA checks are the family contract's (tests/policies/test_family_contract.py), on the
functions at the end of this file; the source tokens, the embedded guidance and Kontext's own settings are checked here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from firm.paths import experiments_root
from firm.policies.families import flux_kontext as fk
from firm.policies.families.base import PixelCodec, calculate_shift, pack_latents, unpack_latents
from firm.policies.policy import FlowPolicy, LoRAConfig, PolicyConfig

RES = 64  # output pixels: 8x8 latents, 16 target tokens
STEPS = 2  # sigmas (1, shifted 1/2, 0): the dynamic shift shows in the middle one
PROMPTS = ["turn the red circle blue", "add a big green square at the top"]
SOURCE_SIZE = (63, 33)  # floored to 48x32 (aspect 1.5): 1248x832; the unfloored aspect 1.91 would pick 1392x752
SOURCE_LATENT = (832 // 8, 1248 // 8)  # (h, w) of the source latents at the pipeline's default
LATENT_CHANNELS = 4
TEXT_DIM = 32  # T5 width = joint_attention_dim; CLIP width = pooled_projection_dim
WORDS = (
    "a an the red blue green yellow circle square triangle star top left right bottom centre big small "
    "and of at turn add make it into replace with"
).split()
MODEL_INDEX = {  # FLUX.1-Kontext-dev's model_index.json
    "_class_name": "FluxKontextPipeline",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SCHEDULER = dict(  # FLUX.1-Kontext-dev's scheduler/scheduler_config.json
    base_image_seq_len=256,
    base_shift=0.5,
    max_image_seq_len=4096,
    max_shift=1.15,
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
)


def clip_tokenizer():
    """CLIP's byte-level BPE: the 256 byte symbols, each also with the ``</w>`` word end, merges that spell
    ``WORDS``, and CLIP's start / end tokens (end = padding), 77 tokens long."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    merges = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            parts = [pair[0] + pair[1]] + parts[2:]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = 77
    return tok


def t5_tokenizer():
    """A unigram tokenizer with T5's pad / eos / unk ids (0 / 1 / 2) and ``▁``-prefixed word pieces."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in WORDS] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz,.!?"]
    tok = T5TokenizerFast(vocab=pieces, extra_ids=0)
    tok.model_max_length = 512
    return tok


def build(root: Path) -> Path:
    """FLUX.1-Kontext-dev's hub layout, tiny and random (the family's own tiny transformer and VAE builders)."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from firm.policies.policy import TinyConfig

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    tiny = TinyConfig(num_layers=1, num_heads=2, head_dim=16, text_dim=TEXT_DIM, rope_axes=[4, 6, 6])
    fam = fk.FluxKontext(PolicyConfig(family="flux_kontext", tiny=tiny))
    fam.tiny_transformer(RES // 8, LATENT_CHANNELS).save_pretrained(root / "transformer")
    fam.tiny_vae(LATENT_CHANNELS).save_pretrained(root / "vae")
    FlowMatchEulerDiscreteScheduler(**SCHEDULER).save_pretrained(root / "scheduler")
    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    clip_tok.save_pretrained(root / "tokenizer")
    t5_tok.save_pretrained(root / "tokenizer_2")
    CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tok),
            hidden_size=TEXT_DIM,
            intermediate_size=2 * TEXT_DIM,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id,  # the pooled state is the first end token's
            pad_token_id=clip_tok.pad_token_id,
        )
    ).save_pretrained(root / "text_encoder")
    T5EncoderModel(
        T5Config(vocab_size=len(t5_tok), d_model=TEXT_DIM, d_kv=16, d_ff=2 * TEXT_DIM, num_layers=1, num_heads=2)
    ).save_pretrained(root / "text_encoder_2")
    index = {**MODEL_INDEX, "_diffusers_version": diffusers.__version__}
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return root


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("flux_kontext_dev"))


def official(root: Path):
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(root)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def policy_for(root: Path, **kw) -> FlowPolicy:
    cfg = PolicyConfig(family="flux_kontext", pretrained=str(root), resolution=RES, lora=LoRAConfig(rank=4, alpha=8))
    for k, v in kw.items():
        setattr(cfg, k, v)
    return FlowPolicy(cfg).eval()


def sources(n: int, seed: int = 0, size: tuple[int, int] = SOURCE_SIZE) -> list:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def noise_for(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, LATENT_CHANNELS, RES // 8, RES // 8, generator=torch.Generator().manual_seed(seed))


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def pipeline_out(pipe, prompts, images, noise, **kw) -> dict:
    """The pipeline from FIRM's initial latents (packed into its token layout): the final latents (unpacked), the
    decoded images, and what its first transformer call received."""
    final, seen = {}, {}

    def keep_latents(_pipe, _i, _t, tensors):  # the pipeline's own per-step hook: the latents after each step
        final["latents"] = tensors["latents"]
        return {}

    def keep_inputs(_module, _args, kwargs):
        if not seen:
            seen.update({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})

    hook = pipe.transformer.register_forward_pre_hook(keep_inputs, with_kwargs=True)
    try:
        with torch.no_grad():
            images = pipe(
                image=images,
                prompt=prompts,
                latents=pack_latents(noise),
                num_inference_steps=STEPS,
                height=RES,
                width=RES,
                max_area=RES * RES,
                output_type="pt",
                callback_on_step_end=keep_latents,
                **kw,
            ).images  # (B, 3, H, W) in [0, 1]
    finally:
        hook.remove()
    return {"latents": unpack_latents(final["latents"], RES // 8, RES // 8), "images": images, "inputs": seen}


@pytest.fixture(scope="module")
def loaded(checkpoint):
    """The pipeline, a FIRM policy, and both at the pipeline's defaults on two prompts (shared, read-only)."""
    pipe, policy = official(checkpoint), policy_for(checkpoint)
    images, noise = sources(2), noise_for(2, 1)
    ref = pipeline_out(pipe, PROMPTS, images, noise)
    with torch.no_grad():
        ours = policy.sample_latents(PROMPTS, noise, STEPS, images=images)
    return {"pipe": pipe, "policy": policy, "images": images, "noise": noise, "ref": ref, "ours": ours}


def test_source_tokens_positions_and_sigmas_equal_the_pipelines(loaded):
    policy, seen, pipe = loaded["policy"], loaded["ref"]["inputs"], loaded["pipe"]
    cond = policy.encode_prompts(PROMPTS, loaded["images"])
    (src,) = cond.image_latents
    assert src.shape == (2, LATENT_CHANNELS, *SOURCE_LATENT)
    n = (RES // 16) ** 2
    tokens = seen["hidden_states"]  # (B, N + N_s, 4C): target tokens, then the source's
    ds = diff(pack_latents(src), tokens[:, n:])
    ids = fk.kontext_image_ids((RES // 8, RES // 8), SOURCE_LATENT)
    dsig = diff(policy.sigmas(STEPS), pipe.scheduler.sigmas)
    print(f"flux_kontext source latents ({tokens.shape[1] - n} tokens at 1248x832): max abs diff {ds:.2e}")
    print(f"flux_kontext sigmas (dynamic shift, {n} target tokens): max abs diff {dsig:.1e}")
    assert ds <= 1e-5 and torch.equal(ids, seen["img_ids"]) and dsig <= 1e-7
    assert torch.equal(seen["guidance"], torch.full((2,), fk.DEFAULT_GUIDANCE))
    # the comparison can see a bug: the dynamic shift of every token (target + source) instead of the target's
    wrong = calculate_shift(ids.shape[0], 256, 4096, 0.5, 1.15)
    policy.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / STEPS, STEPS).tolist(), mu=wrong)
    assert diff(policy.scheduler.sigmas, pipe.scheduler.sigmas) > 1e-3


def test_another_embedded_guidance_equals_the_pipelines_guidance_scale(loaded):
    pipe, policy = loaded["pipe"], loaded["policy"]
    images, noise = loaded["images"][:1], loaded["noise"][:1]
    ref = pipeline_out(pipe, PROMPTS[:1], images, noise, guidance_scale=2.5)
    assert torch.equal(ref["inputs"]["guidance"], torch.tensor([2.5]))
    policy.family.guidance = 2.5
    try:
        with torch.no_grad():
            ours = policy.sample_latents(PROMPTS[:1], noise, STEPS, images=images)
    finally:
        policy.family.guidance = fk.DEFAULT_GUIDANCE
    d = diff(ours, ref["latents"])
    print(f"flux_kontext sampling (embedded guidance 2.5): latents max abs diff {d:.2e}")
    assert d <= 1e-4
    assert diff(loaded["ours"][:1], ref["latents"]) > 1e-3  # FIRM at 3.5 against the pipeline at 2.5: visible


def test_a_batch_needs_one_source_each_resizing_to_one_size(loaded):
    policy = loaded["policy"]
    wide, tall = sources(1, size=(96, 48))[0], sources(1, size=(48, 96))[0]
    with pytest.raises(ValueError, match="different sizes"):
        policy.encode_prompts(PROMPTS, [wide, tall])
    with pytest.raises(ValueError, match="one source image per prompt"):
        policy.encode_prompts(PROMPTS[:1], [[wide, wide]])
    with pytest.raises(ValueError, match="sides of >= 16"):
        policy.encode_prompts(PROMPTS[:1], sources(1, size=(40, 12)))
    with pytest.raises(ValueError, match="every prompt needs one"):
        policy.encode_prompts(PROMPTS[:1])
    # condition_area: the aspect ratio kept at about that many pixels, sides multiples of 16 (FIRM-Reward's 512 px)
    fam = fk.FluxKontext(PolicyConfig(family="flux_kontext", pretrained="x", condition_area=512 * 512))
    vae = policy.codec
    assert fam.source_size(wide, vae) == (720, 368) and fam.source_size(sources(1, size=(40, 40))[0], vae) == (512, 512)
    # pixel latents (a saved tiny checkpoint): the output's area, as for a tiny built model
    pixel = fk.FluxKontext(PolicyConfig(family="flux_kontext", pretrained="x", resolution=32))
    assert pixel.source_size(wide, PixelCodec()) == (46, 22) and fam.source_size(wide, PixelCodec()) == (724, 362)


def test_policy_shift_replaces_the_dynamic_shift_by_a_static_one(checkpoint):
    policy = policy_for(checkpoint, shift=2.0)
    assert not policy.scheduler.config.use_dynamic_shifting
    s = torch.linspace(1.0, 1.0 / STEPS, STEPS)
    torch.testing.assert_close(policy.sigmas(STEPS)[:-1], 2.0 * s / (1 + s), rtol=0, atol=1e-6)


def test_a_tiny_built_policy_edits_from_its_source():
    """``pretrained: null`` (the tiny YAML): pixel latents, sources at the output's area, the source really used."""
    from firm.config import load_experiment, to_object

    cfg = to_object(load_experiment(experiments_root() / "rl/tiny_flux_kontext_nft.yaml"))
    policy = FlowPolicy(cfg.module.policy).eval()
    res = cfg.module.policy.resolution
    images = sources(2, size=(res, res))
    cond = policy.encode_prompts(PROMPTS, images)
    assert cond.image_latents[0].shape == (2, 3, res, res) and policy.latent_shape() == (3, res, res)
    noise = torch.randn(2, 3, res, res, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = policy.sample_latents(PROMPTS, noise, 1, images=images)
        b = policy.sample_latents(PROMPTS, noise, 1, images=images[::-1])
    assert torch.isfinite(a).all() and diff(a[0], b[0]) > 1e-4


def test_full_size_experiment_has_firm_rewards_kontext_settings():
    from firm.config import load_experiment, to_object

    cfg = to_object(load_experiment(experiments_root() / "rl/firm_flux_kontext_cme.yaml"))
    m, p = cfg.module, cfg.module.policy
    m.validate()
    assert (m.name, p.family, p.pretrained) == ("diffusion_nft", "flux_kontext", "black-forest-labs/FLUX.1-Kontext-dev")
    assert (p.resolution, p.max_sequence_length, p.condition_area) == (512, 128, 512 * 512)
    assert (p.lora.rank, p.lora.alpha, p.lora.init) == (32, 64, "gaussian")
    assert set(p.lora.target_modules) == set(fk.FluxKontext.lora_targets)
    assert (m.sampler.num_steps, m.sampler.method, m.sampler.guidance_scale) == (6, "dpm2", 1.0)
    assert (m.lr, m.kl_beta, m.beta, m.ema_decay, m.timestep_fraction) == (1.5e-3, 1e-4, 1.0, 0.9, 0.99)
    assert (m.reward.name, m.reward.w1, m.reward.w2) == ("cme", 0.6, 0.4)
    assert (cfg.data.group_size, cfg.data.batch_size * cfg.trainer.devices) == (12, 48 * 12)


# What the family contract (tests/policies/test_family_contract.py) calls: two prompts, each with its source.


def embeddings(pipe, policy: FlowPolicy) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(FIRM's, the pipeline's) T5 embeddings and pooled CLIP embeddings, for each prompt and the negative one ("")."""
    pairs = []
    for prompt in PROMPTS + [""]:
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None)
        # the text half of policy.encode_prompts (the other half, the source latents, is compared in this file)
        cond = policy.family.stack(policy.text_encoder.encode([prompt]), policy.text_encoder)
        pairs += [(cond.embeds, embeds), (cond.pooled, pooled)]
    return pairs


def check_embeddings(pipe, policy: FlowPolicy, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """512 T5 tokens, text positions all zero; the comparison can see T5 run with its attention mask (the pipeline
    attends to the padding)."""
    assert all(embeds.shape == (1, 512, TEXT_DIM) for embeds, _ in pairs[::2])
    for prompt in PROMPTS + [""]:
        assert torch.equal(pipe.encode_prompt(prompt=prompt, prompt_2=None)[2], torch.zeros(512, 3))
    enc = policy.text_encoder
    tokens = enc.tokenizers[1](PROMPTS[0], padding="max_length", max_length=512, return_tensors="pt")
    masked = enc.t5(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
    assert diff(masked, pairs[0][1]) > 1e-3


def reference(pipe, noise: torch.Tensor, scale: float, decode: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's final latents and decoded images (one call) at its defaults (embedded guidance 3.5); ``scale``
    is its ``true_cfg_scale``, against the negative prompt "" when above 1."""
    cfg = {"true_cfg_scale": scale, "negative_prompt": [""] * len(PROMPTS)} if scale > 1 else {}
    out = pipeline_out(pipe, PROMPTS, sources(len(PROMPTS)), noise, **cfg)
    return out["latents"], out["images"]


def sample(policy: FlowPolicy, noise: torch.Tensor, scale: float) -> torch.Tensor:
    return policy.sample_latents(PROMPTS, noise, STEPS, images=sources(len(PROMPTS)), guidance_scale=scale)


def check_sampling(pipe, policy: FlowPolicy, noise: torch.Tensor, scale: float, ref: torch.Tensor, ours) -> None:
    """The comparison can see a bug: the source encoded at the output's size instead of the preferred resolution."""
    if scale > 1:
        return
    images = sources(len(PROMPTS))
    small = policy_for(Path(policy.config.pretrained), condition_area=RES * RES)
    bad = small.sample_latents(PROMPTS, noise, STEPS, images=images)
    assert small.encode_prompts(PROMPTS[:1], images[:1]).image_latents[0].shape[-2:] == (6, 12)  # 96x48
    assert diff(bad, ref) > 1e-3


def train_lora(checkpoint: Path, tmp_path: Path) -> tuple[FlowPolicy, Path]:
    """A 2-step RL run at 32x32 (sources too), reloaded at the pipeline's defaults (RES, preferred source size)."""
    from firm.config import load_experiment, to_object
    from firm.policies.export import export_lora
    from firm.runner import run

    run_dir = run(
        str(experiments_root() / "rl/tiny_flux_kontext_nft.yaml"),
        [
            f"output_root={tmp_path}",
            f"module.policy.pretrained={checkpoint}",
            "module.policy.resolution=32",
            "module.policy.condition_area=1024",  # 32x32 sources for the rollouts: the adapter does not depend on it
            "trainer.max_steps=2",
            "module.sampler.num_steps=2",
            "data.group_size=2",
            "data.batch_size=2",
            "module.rollout_chunk=2",
            "module.ema_decay=null",
            "module.lr=5e-2",  # two Adam steps of ~lr each must move the (zero-initialised) B matrices visibly
        ],
    )
    out = export_lora(run_dir, tmp_path / "lora")
    cfg = to_object(load_experiment(run_dir / "config.yaml"))
    cfg.module.policy.condition_area, cfg.module.policy.resolution = None, RES  # back to the pipeline's defaults
    policy = FlowPolicy(cfg.module.policy, old_adapter=True).eval()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    sd = {k.removeprefix("policy."): v for k, v in ckpt["state_dict"].items()}
    assert not policy.load_state_dict(sd, strict=False).unexpected_keys
    return policy, out.parent


def check_export(lora_dir: Path) -> None:
    """The adapter covers the double-stream and the single-stream blocks."""
    targets = json.loads((lora_dir / "firm_export.json").read_text())["lora"]["target_modules"]
    assert "single_transformer_blocks.0.attn.to_q" in targets and "transformer_blocks.0.attn.to_add_out" in targets
