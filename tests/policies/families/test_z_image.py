"""Z-Image(-Turbo) against diffusers' ``ZImagePipeline``.

A tiny random checkpoint with the real classes and the hub layout of ``Tongyi-MAI/Z-Image-Turbo`` (``model_index.json``;
a ``Qwen3Model`` text encoder; a byte-level BPE ``Qwen2Tokenizer`` with Qwen3's special tokens and a chat template that
renders a user turn and the generation prompt as Qwen3's does; ``ZImageTransformer2DModel``; an ``AutoencoderKL`` with
the FLUX VAE's scaling / shift factors; the Turbo scheduler config, static shift 3) is loaded by FIRM and by the
pipeline. At the pipeline's default conditioning settings (512 template tokens, hidden_states[-2], no CFG
normalisation or truncation) and with the same initial latents, steps and sigmas, FIRM's sampling equals the
pipeline's with CFG off and on, the decoded images agree, and a LoRA trained by a real 2-step RL run and exported by
FIRM reproduces the trained policy inside the pipeline. Run with ``-s`` to see the numbers.

FIRM's ``guidance_scale`` is the CFG weight ``w`` (1 = off); the pipeline's is ``w - 1`` (0 = off).

The embeddings, sampling and LoRA checks are the family contract's (tests/policies/test_family_contract.py), on the
functions at the end of this file; the CFG knobs and the tiny built model are checked here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from firm.policies.families import z_image as zi
from firm.policies.policy import FlowPolicy, LoRAConfig, PolicyConfig
from tests.policies.families import hub

REPO = Path(__file__).resolve().parents[3]
RES = 32  # output pixels: 16x16 latents of the 2x tiny VAE, 8x8 = 64 image tokens
STEPS = 4
LATENT_CHANNELS = 16  # as the real VAE
QWEN_HIDDEN = 32  # Qwen3 width = the transformer's cap_feat_dim
PROMPTS = ["a red circle at the top left", "a small green triangle"]  # two caption lengths in one batch

# Qwen3's chat template, reduced to what the pipeline renders: the turns, then the assistant turn, opened with an
# empty thinking block only when enable_thinking is false (the real template writes the same text for these inputs).
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
# Tongyi-MAI/Z-Image-Turbo: model_index.json and scheduler/scheduler_config.json
MODEL_INDEX = {
    "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
    "text_encoder": ("transformers", "Qwen3Model"),
    "tokenizer": ("transformers", "Qwen2Tokenizer"),
    "transformer": ("diffusers", "ZImageTransformer2DModel"),
    "vae": ("diffusers", "AutoencoderKL"),
}
SCHEDULER = dict(num_train_timesteps=1000, use_dynamic_shifting=False, shift=3.0)


def qwen3_tokenizer():
    """Qwen's byte-level BPE (its pre-tokenizer regex) trained on a few lines, with Qwen3's special tokens."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
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
    bpe.train_from_iterator(["user\n", "assistant\n", *hub.PROMPTS, *PROMPTS] * 3, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=QWEN3_CHAT_TEMPLATE,
        model_max_length=131072,
    )
    tok.add_tokens(["<think>", "</think>"])  # added, not special, as in Qwen3's tokenizer
    return tok


def build(root: Path) -> Path:
    """The hub layout of Z-Image-Turbo, tiny and random."""
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    tok = qwen3_tokenizer()
    tok.save_pretrained(root / "tokenizer")
    Qwen3Model(
        Qwen3Config(
            vocab_size=len(tok),
            hidden_size=QWEN_HIDDEN,
            intermediate_size=2 * QWEN_HIDDEN,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=1024,
            pad_token_id=tok.pad_token_id,
        )
    ).save_pretrained(root / "text_encoder")
    ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=LATENT_CHANNELS,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=QWEN_HIDDEN,
        axes_dims=[4, 6, 6],
        axes_lens=[1536, 512, 512],
    ).save_pretrained(root / "transformer")
    AutoencoderKL(  # the FLUX VAE's structure (no quant convs) and latent normalisation, two tiny levels
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).save_pretrained(root / "vae")
    hub.flow_scheduler(**SCHEDULER).save_pretrained(root / "scheduler")
    hub.write_model_index(root, "ZImagePipeline", MODEL_INDEX)
    return root


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("z_image_turbo"))


def official(root: Path):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(root)  # the real loader: no torchvision needed
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(checkpoint):
    return official(checkpoint)


def policy_for(root: Path, **kw) -> FlowPolicy:
    cfg = PolicyConfig(family="z_image", pretrained=str(root), resolution=RES, lora=LoRAConfig(rank=4, alpha=8), **kw)
    return FlowPolicy(cfg).eval()


@pytest.fixture(scope="module")
def policy(checkpoint) -> FlowPolicy:
    return policy_for(checkpoint)


def noise_for(policy: FlowPolicy, seed: int = 1) -> torch.Tensor:
    return torch.randn(len(PROMPTS), *policy.latent_shape(), generator=torch.Generator().manual_seed(seed))


def run_pipe(pipe, noise: torch.Tensor, w: float, output_type: str = "latent", **kw) -> torch.Tensor:
    """The pipeline's output from ``noise`` at FIRM's CFG weight ``w`` (the pipeline's guidance_scale ``w - 1``)."""
    with torch.no_grad():
        return pipe(
            prompt=list(PROMPTS),
            height=RES,
            width=RES,
            num_inference_steps=STEPS,
            guidance_scale=w - 1.0,
            latents=noise.clone(),  # the pipeline's own layout (B, C, h, w): nothing to pack
            output_type=output_type,
            **kw,
        ).images


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def test_cfg_normalization_and_truncation_as_the_pipeline(pipe, policy):
    """The pipeline's two non-default guidance knobs: the norm cap, and no guidance at the late steps."""
    noise, w = noise_for(policy, seed=2), 6.0
    knobs = {"cfg_normalization": 1.05, "cfg_truncation": 0.2}  # sigmas (shift 3, 4 steps): 1, .9, .75, .5
    fam = policy.family
    plain = run_pipe(pipe, noise, w)
    capped = run_pipe(pipe, noise, w, cfg_normalization=knobs["cfg_normalization"])
    ref = run_pipe(pipe, noise, w, **knobs)
    try:
        for k, v in knobs.items():
            setattr(fam, k, v)
        with torch.no_grad():
            ours = policy.sample_latents(list(PROMPTS), noise, STEPS, guidance_scale=w)
    finally:
        for k in knobs:
            setattr(fam, k, getattr(zi.ZImage, k))
    d = diff(ours, ref)
    print(f"z_image sampling with cfg_normalization 1.05, cfg_truncation 0.2: max abs diff {d:.2e}")
    assert d <= 1e-4
    assert diff(capped, plain) > 1e-3 and diff(ref, capped) > 1e-3  # each knob changes the pipeline's result


def test_tiny_random_model_and_clear_errors(checkpoint):
    """``pretrained: null`` builds the family's classes (hash text encoder, pixel or tiny VAE); bad settings say why."""
    from firm.policies.encoders import HashTextEncoder
    from firm.policies.policy import TinyConfig

    for vae, channels in (("pixel", 3), ("tiny", 4)):
        cfg = PolicyConfig(family="z_image", resolution=16, tiny=TinyConfig(vae=vae), lora=LoRAConfig(rank=2, alpha=2))
        policy = FlowPolicy(cfg).eval()
        assert type(policy.transformer).__name__ == "ZImageTransformer2DModel"
        assert policy.latent_shape()[0] == channels
        cond = policy.encode_prompts(["a red circle", "a blue square at the bottom"])
        x = torch.randn(2, *policy.latent_shape())
        with torch.no_grad():
            v = policy.velocity(x, torch.tensor([0.9, 0.4]), cond)
            with pytest.raises(ValueError, match="needs the unconditional"):
                policy.velocity(x, torch.tensor([0.9, 0.4]), cond, guidance_scale=2.0)
            guided = policy.velocity(
                x, torch.tensor([0.9, 0.4]), cond, guidance_scale=2.0, uncond=policy.encode_negative(cond)
            )
        assert v.shape == x.shape and torch.isfinite(v).all() and diff(guided, v) > 0
    with pytest.raises(ValueError, match="rope_axes"):
        FlowPolicy(PolicyConfig(family="z_image", resolution=16, tiny=TinyConfig(rope_axes=[4, 4, 4])))
    policy = policy_for(checkpoint)
    with pytest.raises(ValueError, match="no source images"):
        policy.text_encoder.encode(["a red circle"], [object()])
    narrow = HashTextEncoder(HashTextEncoder.Config(dim=16))  # the transformer takes 32-wide captions
    with pytest.raises(ValueError, match="cap_feat_dim"):
        policy.family.check({"transformer": policy.transformer, "codec": policy.codec, "text_encoder": narrow})


# What the family contract (tests/policies/test_family_contract.py) calls: two prompts of different lengths. Its
# guidance scales are FIRM's (1 = off); ``run_pipe`` passes the pipeline ``w - 1``.


def embeddings(pipe, policy: FlowPolicy) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(FIRM's, the pipeline's) embeddings of each prompt and of the negative prompt (""), FIRM's one prompt per call
    (as its cache encodes them) against the pipeline's batched call."""
    ref, ref_neg = pipe.encode_prompt(prompt=list(PROMPTS), device=torch.device("cpu"))
    ours = [policy.text_encoder.encode([p])[0].embeds for p in [*PROMPTS, ""]]
    return list(zip(ours, [*ref, *ref_neg]))


def check_embeddings(pipe, policy: FlowPolicy, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Variable lengths (no padding kept); the comparison can see the last hidden layer instead of the second-to-last,
    and the template rendered without the pipeline's enable_thinking=True (an empty thinking block)."""
    ref = [r for _, r in pairs[: len(PROMPTS)]]
    assert len({r.shape[0] for r in ref}) == 2
    enc = policy.text_encoder
    tokens = enc.tokenizer([enc.text(PROMPTS[0])], return_tensors="pt")
    last = enc.model(**tokens, output_hidden_states=True).hidden_states[-1][0]
    assert last.shape == ref[0].shape and diff(last, ref[0]) > 1e-3
    wrong = enc.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPTS[0]}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert len(enc.tokenizer(wrong).input_ids) != ref[0].shape[0]


def reference(pipe, noise: torch.Tensor, w: float, decode: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The pipeline's final latents and (``decode``) images from ``noise`` at FIRM's CFG weight ``w``."""
    return run_pipe(pipe, noise, w), run_pipe(pipe, noise, w, output_type="pt") if decode else None


def sample(policy: FlowPolicy, noise: torch.Tensor, w: float) -> torch.Tensor:
    return policy.sample_latents(list(PROMPTS), noise, STEPS, guidance_scale=w)


def check_sampling(pipe, policy: FlowPolicy, noise: torch.Tensor, w: float, ref: torch.Tensor, ours) -> None:
    """The same sigmas to the bit; the model really moves the latents; the comparison can see a wrong schedule (shift 2
    instead of the checkpoint's 3) and the scale convention (FIRM's w passed as the pipeline's guidance_scale)."""
    assert diff(policy.sigmas(STEPS), pipe.scheduler.sigmas) == 0.0
    assert diff(ours, noise) > 1e-1
    if w == 1.0:
        shifted = policy_for(Path(policy.config.pretrained), shift=2.0).sample_latents(list(PROMPTS), noise, STEPS)
        assert diff(shifted, ref) > 1e-3
    else:
        naive = policy.sample_latents(list(PROMPTS), noise, STEPS, guidance_scale=w - 1.0)
        assert diff(naive, ref) > 1e-3


def train_lora(checkpoint: Path, tmp_path: Path) -> tuple[FlowPolicy, Path]:
    """A 2-step DiffusionNFT run on the checkpoint, exported, and the run's policy with its trained adapters."""
    from firm.config import load_experiment, to_object
    from firm.policies.export import export_lora
    from firm.runner import run

    overrides = [
        f"output_root={tmp_path}",
        f"module.policy.pretrained={checkpoint}",
        f"module.policy.resolution={RES}",
        "trainer.max_steps=2",
        "trainer.checkpoint_every_n_steps=2",
        "module.lr=3.0e-2",  # a large step so that the adapter's effect is far above the tolerance
        "module.ema_decay=null",
        "module.log_images_every=0",
    ]
    run_dir = run(str(REPO / "experiments" / "rl" / "tiny_z_image_nft.yaml"), overrides)
    out = export_lora(run_dir, tmp_path / "lora")
    cfg = to_object(load_experiment(run_dir / "config.yaml"))
    trained = FlowPolicy(cfg.module.policy, old_adapter=True).eval()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    loaded = trained.load_state_dict({k.removeprefix("policy."): v for k, v in ckpt["state_dict"].items()}, False)
    assert not loaded.unexpected_keys
    return trained, out.parent
