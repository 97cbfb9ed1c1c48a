"""FLUX.2 [klein] against diffusers' ``Flux2KleinPipeline``.

A tiny random checkpoint with the real classes and the hub layout of ``black-forest-labs/FLUX.2-klein-base-4B``
(``model_index.json``; ``Qwen3ForCausalLM`` text encoder with enough layers for the pipeline's hidden-state layers
9 / 18 / 27; a byte-level BPE ``Qwen2TokenizerFast`` with Qwen3's special tokens and a chat template that renders the
generation prompt as Qwen3's does; ``Flux2Transformer2DModel``; ``AutoencoderKLFlux2`` with non-trivial batch-norm
statistics; the FLUX scheduler config) is loaded by FIRM and by the pipeline. At the pipeline's default conditioning
settings (512 text tokens, its template, its layers, its empirical shift) and with the same initial latents and steps,
FIRM's sampling equals the pipeline's with CFG off and on, the decoded images agree, and a LoRA trained by a real RL
run and exported by FIRM reproduces the trained policy inside the pipeline. Run with ``-s`` to see the numbers. The
embeddings, sampling and LoRA checks are the family contract's (tests/policies/test_family_contract.py), on the
functions at the end of this file; the codec and the distilled checkpoints are checked here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from firm.paths import experiments_root
from firm.policies.families import flux2_klein as fk
from firm.policies.policy import FlowPolicy, LoRAConfig, PolicyConfig

RES = 64  # output pixels: 8x8 VAE latents, 4x4 = 16 image tokens
STEPS = 3
PROMPT = "a red circle at the top left"
LATENT_CHANNELS = 4  # VAE latent channels (16 after the 2x2 patchify; the real VAE has 32 -> 128)
QWEN_HIDDEN = 16  # Qwen3 width: the transformer's joint_attention_dim is 3 x 16
QWEN_LAYERS = 28  # >= 27, the deepest layer the pipeline reads (the real Qwen3-4B has 36)

# Qwen3's chat template, reduced to what the pipeline renders: user turns, then the assistant turn opened with an
# empty thinking block when enable_thinking is false (the real template writes the same text for these inputs).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
CORPUS = [
    "<|im_start|>user\n",
    "<|im_start|>assistant\n",
    "a red circle at the top left",
    "a small green triangle at the bottom right",
    "a big blue square in the centre",
]
# FLUX.2-klein's scheduler/scheduler_config.json (the FLUX scheduler: dynamic, exponential time shift)
SCHEDULER = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    invert_sigmas=False,
    max_image_seq_len=4096,
    max_shift=1.15,
    num_train_timesteps=1000,
    shift=3.0,
    shift_terminal=None,
    stochastic_sampling=False,
    time_shift_type="exponential",
    use_beta_sigmas=False,
    use_dynamic_shifting=True,
    use_exponential_sigmas=False,
    use_karras_sigmas=False,
)
MODEL_INDEX = {
    "_class_name": "Flux2KleinPipeline",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen3ForCausalLM"],
    "tokenizer": ["transformers", "Qwen2TokenizerFast"],
    "transformer": ["diffusers", "Flux2Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLFlux2"],
}


def qwen3_tokenizer():
    """Qwen's byte-level BPE (its pre-tokenizer regex) trained on a few lines, with Qwen3's special tokens."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(CORPUS * 3, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Qwen2TokenizerFast(
        vocab=model["vocab"],
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=QWEN3_CHAT_TEMPLATE,
        model_max_length=40960,
    )
    tok.add_tokens(["<think>", "</think>"])  # added, not special, as in Qwen3's tokenizer
    return tok


def build(root: Path, *, distilled: bool | None = None) -> Path:
    """The hub layout of FLUX.2-klein(-base), tiny and random. ``distilled``: write ``is_distilled`` (the base
    checkpoints' model_index.json has no such key)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    tok = qwen3_tokenizer()
    tok.save_pretrained(root / "tokenizer")
    Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tok),
            hidden_size=QWEN_HIDDEN,
            intermediate_size=2 * QWEN_HIDDEN,
            num_hidden_layers=QWEN_LAYERS,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=1024,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            tie_word_embeddings=True,
        )
    ).save_pretrained(root / "text_encoder")
    Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=len(fk.HIDDEN_STATE_LAYERS) * QWEN_HIDDEN,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,  # klein has no guidance embedding
    ).save_pretrained(root / "transformer")
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8, 8, 8),  # four levels: 8x downsampling, as the real VAE
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
    )
    with torch.no_grad():  # batch-norm statistics far from (0, 1), so that a wrong normalisation shows
        vae.bn.running_mean.copy_(0.5 * torch.randn(4 * LATENT_CHANNELS))
        vae.bn.running_var.copy_(0.25 + 2.0 * torch.rand(4 * LATENT_CHANNELS))
    vae.save_pretrained(root / "vae")
    FlowMatchEulerDiscreteScheduler(**SCHEDULER).save_pretrained(root / "scheduler")
    write_index(root, distilled)
    return root


def write_index(root: Path, distilled: bool | None) -> None:
    import diffusers

    index = {**MODEL_INDEX, "_diffusers_version": diffusers.__version__}
    if distilled is not None:
        index["is_distilled"] = distilled
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("flux2_klein_base"))


@pytest.fixture(scope="module")
def loaded(checkpoint):
    """The pipeline and a FIRM policy on the base checkpoint, shared by the read-only tests."""
    return official(checkpoint), policy_for(checkpoint)


def official(root: Path):
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(root)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def policy_for(root: Path, **kw) -> FlowPolicy:
    cfg = PolicyConfig(family="flux2_klein", pretrained=str(root), resolution=RES, lora=LoRAConfig(rank=4, alpha=8))
    for k, v in kw.items():
        setattr(cfg, k, v)
    return FlowPolicy(cfg).eval()


def pipeline_out(pipe, noise: torch.Tensor, scale: float, output_type: str = "latent") -> torch.Tensor:
    """The pipeline from FIRM's initial latents (patchified into its (B, 4C, h/2, w/2) layout), at its defaults."""
    return pipe(
        prompt=PROMPT,
        height=RES,
        width=RES,
        num_inference_steps=STEPS,
        guidance_scale=scale,
        latents=fk.patchify(noise),
        output_type=output_type,
    ).images  # latent: (B, C, h, w) denormalised, unpatchified; pt: (B, 3, H, W) in [0, 1]


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def noise_for(policy: FlowPolicy, seed: int) -> torch.Tensor:
    return torch.randn(1, *policy.latent_shape(), generator=torch.Generator().manual_seed(seed))


def test_codec_equals_the_pipelines_vae_normalisation(loaded):
    pipe, policy = loaded
    image = torch.rand(1, 3, RES, RES, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = pipe._encode_vae_image(image * 2 - 1, generator=None)  # (1, 4C, h/2, w/2), normalised
        ours = policy.encode_images(image)
    d = diff(fk.patchify(ours), ref)
    print(f"flux2_klein VAE encode + batch-norm normalisation: max abs diff {d:.2e}")
    assert d <= 1e-5
    assert torch.allclose(policy.codec.normalize(policy.codec.denormalize(ours)), ours, atol=1e-5)


def test_a_distilled_checkpoint_ignores_guidance_as_the_pipeline_does(tmp_path, checkpoint):
    root = tmp_path / "distilled"
    shutil.copytree(checkpoint, root)
    write_index(root, True)
    pipe, policy = official(root), policy_for(root)
    assert pipe.config.is_distilled and policy.family.is_distilled and not policy.needs_uncond(4.0)
    noise = noise_for(policy, 2)
    with torch.no_grad():
        ref = pipeline_out(pipe, noise, 4.0)
        ours = policy.sample_latents([PROMPT], noise, STEPS, guidance_scale=4.0)
    d = diff(policy.codec.denormalize(ours), ref)
    print(f"flux2_klein distilled checkpoint, guidance_scale 4 (ignored): max abs diff {d:.2e}")
    assert d <= 1e-4


# What the family contract (tests/policies/test_family_contract.py) calls. The pipeline's latent output is
# denormalised (the family's codec normalises with the VAE's batch-norm statistics): the contract compares
# ``policy.codec.denormalize`` of FIRM's latents with it.


def embeddings(pipe, policy: FlowPolicy) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(FIRM's, the pipeline's) embeddings of the prompt and of the negative prompt ("")."""
    ref, _ = pipe.encode_prompt(prompt=PROMPT, device=torch.device("cpu"))
    neg, _ = pipe.encode_prompt(prompt="", device=torch.device("cpu"))
    cond = policy.encode_prompts([PROMPT])
    return [(cond.embeds, ref), (policy.encode_negative(cond).embeds, neg)]


def check_embeddings(pipe, policy: FlowPolicy, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """512 tokens of three stacked layers, no mask, the pipeline's text and image positions; the comparison can see
    the hidden states of the wrong layers, or a template without the empty think block."""
    ref = pairs[0][1]
    assert ref.shape == (1, 512, 3 * QWEN_HIDDEN) and policy.encode_prompts([PROMPT]).mask is None
    _, ref_ids = pipe.encode_prompt(prompt=PROMPT, device=torch.device("cpu"))
    assert torch.equal(fk.text_ids(512), ref_ids[0])
    grid = torch.zeros(1, 4 * LATENT_CHANNELS, RES // 16, RES // 16)
    assert torch.equal(fk.latent_ids(RES // 16, RES // 16), pipe._prepare_latent_ids(grid)[0])
    enc = policy.text_encoder
    shifted = fk.Flux2KleinTextEncoder(enc.model, enc.tokenizer, layers=(8, 17, 26))
    assert diff(shifted.encode([PROMPT])[0].embeds, ref[0]) > 1e-3
    text = enc.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    assert "<think>" not in text and "<think>" in enc.text(PROMPT)


def reference(pipe, noise: torch.Tensor, scale: float, decode: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The pipeline's final latents (denormalised) and (``decode``) images from ``noise`` at ``guidance_scale``."""
    return pipeline_out(pipe, noise, scale), pipeline_out(pipe, noise, scale, output_type="pt") if decode else None


def sample(policy: FlowPolicy, noise: torch.Tensor, scale: float) -> torch.Tensor:
    return policy.sample_latents([PROMPT], noise, STEPS, guidance_scale=scale)


def check_sampling(pipe, policy: FlowPolicy, noise: torch.Tensor, scale: float, ref: torch.Tensor, ours) -> None:
    """The comparison can see a bug: FLUX.1's linear mu instead of FLUX.2's empirical one."""
    if scale != 1.0:
        return
    wrong = policy.family.linspace_sigmas(policy.scheduler, STEPS, policy.latent_shape())
    assert diff(wrong, pipe.scheduler.sigmas) > 1e-3
    policy._sigma_cache[STEPS] = wrong
    try:
        bad = policy.sample_latents([PROMPT], noise, STEPS)
    finally:
        policy._sigma_cache.pop(STEPS)
    assert diff(policy.codec.denormalize(bad), ref) > 1e-3


def train_lora(checkpoint: Path, tmp_path: Path) -> tuple[FlowPolicy, Path]:
    from firm.config import load_experiment, to_object
    from firm.policies.export import export_lora
    from firm.runner import run

    run_dir = run(
        str(experiments_root() / "rl/tiny_flux2_klein_nft.yaml"),
        [
            f"output_root={tmp_path}",
            f"module.policy.pretrained={checkpoint}",
            f"module.policy.resolution={RES}",
            "module.policy.lora.init=gaussian",  # B != 0: the adapter changes the output before any update
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
    policy = FlowPolicy(cfg.module.policy, old_adapter=True).eval()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    sd = {k.removeprefix("policy."): v for k, v in ckpt["state_dict"].items()}
    assert not policy.load_state_dict(sd, strict=False).unexpected_keys
    return policy, out.parent


def check_export(lora_dir: Path) -> None:
    """The adapter covers the double-stream and the single-stream blocks."""
    targets = json.loads((lora_dir / "firm_export.json").read_text())["lora"]["target_modules"]
    assert "single_transformer_blocks.0.attn.to_out" in targets and "transformer_blocks.0.ff.linear_in" in targets
