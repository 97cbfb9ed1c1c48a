"""The flow policy: loading saved tiny checkpoints, adapters (trained / old / reference), encoders, codecs."""

import pytest
import torch
from PIL import Image

from firm.policies.encoders import Conditioning, HashTextEncoder
from firm.policies.families.base import pack_latents, unpack_latents
from firm.policies.policy import FlowPolicy, build_tiny_components, save_components
from tests.policies.conftest import tiny_policy_config


def perturb(policy: FlowPolicy, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("family,vae", [("sd3", "tiny"), ("qwen_image_edit", "tiny"), ("qwen_image_edit", "pixel")])
def test_saved_tiny_checkpoint_loads_back_identically(tmp_path, family, vae):
    cfg = tiny_policy_config(family, tiny={"vae": vae}, condition_area=32 * 32)
    comps = build_tiny_components(cfg)
    save_components(comps, tmp_path / "ckpt")
    built = FlowPolicy(cfg, components=comps)
    area = {
        "condition_area": 32 * 32
    }  # the edit source's VAE area: a saved checkpoint would take the pipeline's 1024^2
    loaded = FlowPolicy(tiny_policy_config(family, pretrained=str(tmp_path / "ckpt"), tiny={"vae": vae}, **area))
    assert type(loaded.codec) is type(built.codec) and isinstance(loaded.text_encoder, HashTextEncoder)
    src = [Image.new("RGB", (24, 20), (200, 10, 10))] * 2 if family != "sd3" else None
    cond_a = built.encode_prompts(["a red circle", "blue square"], src)
    cond_b = loaded.encode_prompts(["a red circle", "blue square"], src)
    x = torch.randn(2, *built.latent_shape())
    s = torch.tensor([0.9, 0.3])
    torch.testing.assert_close(built.velocity(x, s, cond_a), loaded.velocity(x, s, cond_b))
    torch.testing.assert_close(built.sigmas(4), loaded.sigmas(4))


def test_reference_is_the_base_and_old_adapter_follows_by_decay():
    policy = FlowPolicy(tiny_policy_config("sd3"), old_adapter=True)
    cond = policy.encode_prompts(["a red circle", "a blue square"])
    x, s = torch.randn(2, *policy.latent_shape()), torch.tensor([0.7, 0.4])
    v0 = policy.velocity(x, s, cond)
    perturb(policy)
    v_trained = policy.velocity(x, s, cond)
    with policy.adapter(None):
        v_ref = policy.velocity(x, s, cond)
    with policy.adapter("old"):
        v_old = policy.velocity(x, s, cond)
    assert not torch.allclose(v_trained, v0)
    torch.testing.assert_close(v_ref, v0)  # adapters disabled: the base model
    torch.testing.assert_close(v_old, v0)  # the old adapter has not moved yet
    # old <- 0.25 * old + 0.75 * new, tensor by tensor
    new = {k: v.clone() for k, v in policy.named_adapter_parameters("default").items()}
    old = {k: v.clone() for k, v in policy.named_adapter_parameters("old").items()}
    policy.update_old(0.25)
    for k, p in policy.named_adapter_parameters("old").items():
        nk = k.replace(".old.", ".default.")
        torch.testing.assert_close(p, 0.25 * old[k] + 0.75 * new[nk])
    # only the trained adapter requires grad, whatever adapter was last active
    assert all(p.requires_grad for p in policy.trainable_parameters())
    assert not any(p.requires_grad for p in policy.named_adapter_parameters("old").values())
    assert not any(p.requires_grad for n, p in policy.named_parameters() if "lora_" not in n)


def test_lora_targets_rank_and_alpha_come_from_the_config():
    cfg = tiny_policy_config("sd3")
    cfg.lora.target_modules = ["attn.to_q", "attn.to_v"]
    policy = FlowPolicy(cfg)
    names = list(policy.named_adapter_parameters("default"))
    assert names and all((".to_q." in n or ".to_v." in n) for n in names)
    layer = next(m for m in policy.transformer.modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    assert layer.r["default"] == 4 and layer.scaling["default"] == pytest.approx(8.0 / 4)
    cfg.lora.target_modules = ["nope"]
    with pytest.raises(ValueError, match="match no module"):
        FlowPolicy(cfg)


def test_gradient_checkpointing_still_trains_the_adapter():
    cfg = tiny_policy_config("sd3", gradient_checkpointing=True, lora_init="gaussian")
    policy = FlowPolicy(cfg)
    policy.transformer.train()
    cond = policy.encode_prompts(["a red circle"] * 2)
    v = policy.velocity(torch.randn(2, *policy.latent_shape()), torch.tensor([0.5, 0.5]), cond)
    v.pow(2).mean().backward()
    grads = [p.grad for p in policy.trainable_parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_prompt_embeddings_are_cached_and_padded_independently_of_the_batch():
    policy = FlowPolicy(tiny_policy_config("sd3"))
    calls = []
    orig = policy.text_encoder.encode
    policy.text_encoder.encode = lambda p, i=None: calls.append(list(p)) or orig(p, i)
    a = policy.encode_prompts(["a red circle", "a red circle", "blue"])
    b = policy.encode_prompts(["a red circle", "green big triangle top left of the centre"])
    # one encoder call per prompt that missed the cache: an embedding never depends on its batch mates, so a resumed
    # run (empty cache, other groupings) computes the same bits
    assert calls == [["a red circle"], ["blue"], ["green big triangle top left of the centre"]]
    assert torch.equal(a.embeds[0], b.embeds[0])  # bitwise the same row whatever else is in the batch


def test_cfg_combines_conditional_and_unconditional_velocities():
    policy = FlowPolicy(tiny_policy_config("sd3"))
    cond = policy.encode_prompts(["a red circle", "blue square"])
    unc = policy.encode_negative(cond)
    x, s = torch.randn(2, *policy.latent_shape()), torch.tensor([0.8, 0.8])
    vc, vu = policy.velocity(x, s, cond), policy.velocity(x, s, unc)
    torch.testing.assert_close(policy.velocity(x, s, cond, guidance_scale=3.0, uncond=unc), vu + 3.0 * (vc - vu))
    with pytest.raises(ValueError, match="uncond"):
        policy.velocity(x, s, cond, guidance_scale=2.0)


def test_editing_policy_conditions_on_the_source_image():
    policy = FlowPolicy(tiny_policy_config("qwen_image_edit", lora_init="gaussian"))
    red, blue = Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))
    ca = policy.encode_prompts(["make it green"], [red])
    cb = policy.encode_prompts(["make it green"], [blue])
    assert ca.image_latents is not None and not torch.equal(ca.image_latents[0], cb.image_latents[0])
    x, s = torch.randn(1, *policy.latent_shape()), torch.tensor([0.5])
    assert not torch.allclose(policy.velocity(x, s, ca), policy.velocity(x, s, cb))
    with pytest.raises(ValueError, match="source image"):
        policy.encode_prompts(["make it green"])


def test_pack_unpack_round_trip():
    x = torch.randn(2, 4, 6, 8)
    assert pack_latents(x).shape == (2, 12, 16)
    torch.testing.assert_close(unpack_latents(pack_latents(x), 6, 8), x)


def test_conditioning_cat_pads_and_masks():
    a = Conditioning(torch.ones(1, 2, 3))
    b = Conditioning(torch.ones(2, 4, 3), torch.ones(2, 4, dtype=torch.long))
    c = Conditioning.cat([a, b])
    assert c.embeds.shape == (3, 4, 3) and c.mask[0].tolist() == [1, 1, 0, 0]


def test_hash_encoder_saves_and_loads(tmp_path):
    enc = HashTextEncoder(HashTextEncoder.Config(dim=16, pooled_dim=8))
    enc.save_pretrained(tmp_path / "enc")
    back = HashTextEncoder.from_pretrained(tmp_path / "enc")
    a, b = enc.encode(["a red circle", ""]), back.encode(["a red circle", ""])
    torch.testing.assert_close(a[0].embeds, b[0].embeds)
    assert a[1].embeds.shape[0] == 1  # the empty prompt keeps its begin token


def test_real_sd3_text_stack_loads_from_pretrained(tiny_sd3_checkpoint):
    from firm.policies.families.sd3 import SD3TextEncoders

    policy = FlowPolicy(tiny_policy_config("sd3", pretrained=str(tiny_sd3_checkpoint), max_sequence_length=8))
    assert isinstance(policy.text_encoder, SD3TextEncoders) and policy.text_encoder.t5 is not None
    cond = policy.encode_prompts(["a red circle", "a blue square top left"])
    assert cond.embeds.shape == (2, 16 + 8, 32) and cond.pooled.shape == (2, 16)
    v = policy.velocity(torch.randn(2, *policy.latent_shape()), torch.tensor([0.5, 0.2]), cond)
    assert v.shape == (2, 4, 8, 8) and torch.isfinite(v).all()
    no_t5 = FlowPolicy(
        tiny_policy_config("sd3", pretrained=str(tiny_sd3_checkpoint), use_t5=False, max_sequence_length=8)
    )
    e = no_t5.encode_prompts(["a red circle"]).embeds  # without T5, zeros as long as CLIP's tokens (the pipeline's)
    assert e.shape == (1, 32, 32) and torch.equal(e[0, 16:], torch.zeros(16, 32))


def test_mismatched_channels_are_a_clear_error(tmp_path):
    comps = build_tiny_components(tiny_policy_config("sd3", tiny={"vae": "tiny"}))
    save_components(comps, tmp_path / "c")
    with pytest.raises(ValueError, match="input channels"):
        FlowPolicy(tiny_policy_config("sd3", pretrained=str(tmp_path / "c"), vae="pixel"))


@pytest.mark.parametrize("family", ["sd3", "qwen_image", "qwen_image_edit", "flux_kontext", "flux2_klein", "z_image"])
def test_activation_checkpointing_gives_the_same_gradients(family):
    """policy.gradient_checkpointing recomputes every transformer block in backward (each block runs twice) and the
    adapters' gradients equal those of the plain backward."""
    from firm.vocab import Task

    def grads(checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
        cfg = tiny_policy_config(
            family, gradient_checkpointing=checkpointing, lora_init="gaussian", tiny={"num_layers": 2}
        )
        policy = FlowPolicy(cfg)
        policy.transformer.train()
        calls = []
        blocks = tuple(policy.fsdp_wrap_modules())
        for m in policy.transformer.modules():
            if isinstance(m, blocks):
                # a pre-hook: a recomputation in backward may stop once it has what it needs, before the block returns
                m.register_forward_pre_hook(lambda *_: calls.append(1))
        torch.manual_seed(0)
        images = [Image.new("RGB", (16, 16), (200, 30, 30))] * 2 if policy.family.task == Task.EDIT else None
        cond = policy.encode_prompts(["a red circle", "a blue square"], images)
        x = torch.randn(2, *policy.latent_shape())
        v = policy.velocity(x, torch.tensor([0.7, 0.3]), cond)
        v.pow(2).mean().backward()
        named = {n: p.grad.detach().clone() for n, p in policy.named_parameters() if p.grad is not None}
        return named, len(calls)

    plain, plain_calls = grads(False)
    ckpt, ckpt_calls = grads(True)
    assert plain_calls > 0 and ckpt_calls == 2 * plain_calls  # really recomputed in backward
    assert plain.keys() == ckpt.keys() and any(g.abs().sum() > 0 for g in plain.values())
    for name, g in plain.items():
        torch.testing.assert_close(ckpt[name], g, rtol=1e-5, atol=1e-7, msg=name)
