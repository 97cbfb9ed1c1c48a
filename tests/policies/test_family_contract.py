"""The contract every model family keeps with its official diffusers pipeline, checked for each family of a table.

Each family's file in tests/policies/families/ builds a tiny random checkpoint with the real classes and the hub layout
(``build``), and says how to load and call the pipeline and FIRM on it (``official``, ``policy_for``, ``embeddings``,
``reference``, ``sample``, ``train_lora``). This file holds the three checks every family passes on that checkpoint:

1. FIRM's prompt embeddings equal the pipeline's ``encode_prompt``;
2. from the same initial latents and steps, FIRM's sampling equals the pipeline's with guidance off and on: the same
   sigmas, final latents and decoded images, and the comparison would see the guidance missing;
3. a LoRA trained by a 2-step RL run and exported by FIRM reproduces the trained policy inside the pipeline
   (``load_lora_weights``), and visibly changes its output. It trains, so it is marked ``slow``: ``make test`` runs it,
   ``make test-fast`` does not.

A family's file may add ``check_embeddings``, ``check_sampling`` and ``check_export``: what only that family needs
(positions, token counts, that the comparison can see a family-specific bug), run here on the same outputs. The rest of
a family's checks (its guidance knobs, a second pipeline class, tiny built models) are tests in its own file. A new
family: copy a family file, give it those functions, and add a row to ``FAMILIES``. Run with ``-s`` to see the numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.policies.families import (
    test_flux2_klein,
    test_flux_kontext,
    test_qwen_image,
    test_qwen_image_edit,
    test_sd3,
    test_z_image,
)


def same(policy, latents: torch.Tensor) -> torch.Tensor:
    return latents


def denormalized(policy, latents: torch.Tensor) -> torch.Tensor:
    return policy.codec.denormalize(latents)


@dataclass(frozen=True)
class Family:
    name: str  # the family's registry name
    module: ModuleType  # its file in tests/policies/families: checkpoint, pipeline and FIRM calls, its own checks
    scales: tuple[float, ...]  # FIRM guidance scales compared (1.0 = off; the first must be 1.0)
    embed_tol: float  # max abs difference of the prompt embeddings
    guidance_effect: float  # FIRM without guidance is at least this far from the pipeline with guidance
    lora_scale: float  # the guidance scale of the LoRA round trip
    lora_effect: float  # the trained adapter moves the pipeline's output by more than this
    batch: int = 1  # prompts per call (the family file's prompts)
    needs: tuple[str, ...] = ()  # fixtures ``build`` takes besides the directory
    pipeline_latents: Callable = same  # FIRM's latents -> the space of the pipeline's latent output


FAMILIES = [
    Family("sd3", test_sd3, (1.0, 4.5), 0.0, 1e-2, 4.5, 1e-3, needs=("tiny_sd3_checkpoint",)),
    Family("qwen_image", test_qwen_image, (1.0, 4.0), 1e-5, 1e-2, 4.0, 1e-3),
    Family("qwen_image_edit", test_qwen_image_edit, (1.0, 4.0), 1e-5, 1e-3, 1.0, 1e-3),
    Family("flux_kontext", test_flux_kontext, (1.0, 2.0), 1e-6, 1e-2, 1.0, 1e-2, batch=2),
    Family("flux2_klein", test_flux2_klein, (1.0, 4.0), 1e-6, 1e-2, 4.0, 1e-2, pipeline_latents=denormalized),
    Family("z_image", test_z_image, (1.0, 4.0), 1e-5, 1e-2, 1.0, 1e-2, batch=2),
]


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda f: f.name)
def family(request) -> Family:
    return request.param


@pytest.fixture(scope="module")
def checkpoint(family, request, tmp_path_factory) -> Path:
    needs = {name: request.getfixturevalue(name) for name in family.needs}
    return family.module.build(tmp_path_factory.mktemp(family.name) / "hub", **needs)


@pytest.fixture(scope="module")
def loaded(family, checkpoint):
    """The official pipeline and a FIRM policy on the family's checkpoint, shared by the first two checks."""
    return family.module.official(checkpoint), family.module.policy_for(checkpoint)


def noise_for(family: Family, policy, seed: int) -> torch.Tensor:
    return torch.randn(family.batch, *policy.latent_shape(), generator=torch.Generator().manual_seed(seed))


def test_embeddings_equal_encode_prompt(family, loaded):
    pipe, policy = loaded
    with torch.no_grad():
        pairs = family.module.embeddings(pipe, policy)  # [(FIRM's, the pipeline's)]
        d = max(diff(ours, ref) for ours, ref in pairs)
        print(f"{family.name} embeddings: {[tuple(ref.shape) for _, ref in pairs]}, max abs diff {d:.2e}")
        assert all(ours.shape == ref.shape for ours, ref in pairs) and d <= family.embed_tol
        if hasattr(family.module, "check_embeddings"):
            family.module.check_embeddings(pipe, policy, pairs)


def test_sampling_equals_the_pipeline(family, loaded):
    pipe, policy = loaded
    mod = family.module
    noise = noise_for(family, policy, seed=1)
    assert family.scales[0] == 1.0
    unguided = None
    for scale in family.scales:
        assert policy.needs_uncond(scale) == (scale > 1.0)  # guidance on <=> a second, unconditional pass
        with torch.no_grad():
            ref, ref_images = mod.reference(pipe, noise, scale)
            ours = mod.sample(policy, noise, scale)
            images = policy.decode(ours)
        latents = family.pipeline_latents(policy, ours)
        d, di = diff(latents, ref), diff(images, ref_images)
        ds = diff(policy.sigmas(mod.STEPS), pipe.scheduler.sigmas)
        print(f"{family.name} sampling, guidance {scale}: sigmas {ds:.1e}, latents {d:.2e}, decoded images {di:.2e}")
        assert ref_images.shape == images.shape == (family.batch, 3, mod.RES, mod.RES)
        assert ds <= 1e-7 and d <= 1e-4 and di <= 1e-4, f"guidance {scale}"
        if hasattr(mod, "check_sampling"):
            with torch.no_grad():
                mod.check_sampling(pipe, policy, noise, scale, ref, ours)
        if scale == 1.0:
            unguided = latents
            continue
        effect = diff(unguided, ref)  # the guidance really changes the output: the comparison would see it missing
        print(f"{family.name} sampling: FIRM without guidance against the pipeline at {scale}: {effect:.2e}")
        assert effect > family.guidance_effect, f"guidance {scale}"


@pytest.mark.slow  # a 2-step RL run (a full Lightning fit) per family
def test_exported_lora_reproduces_the_trained_policy_in_the_pipeline(family, checkpoint, tmp_path, monkeypatch):
    monkeypatch.delenv("FIRM_RUN_DIR", raising=False)
    mod, scale = family.module, family.lora_scale
    policy, lora_dir = mod.train_lora(checkpoint, tmp_path)  # the run's policy with its trained adapters
    if hasattr(mod, "check_export"):
        mod.check_export(lora_dir)
    noise = noise_for(family, policy, seed=3)
    pipe = mod.official(checkpoint)
    with torch.no_grad():
        base = mod.reference(pipe, noise, scale, decode=False)[0]
        ours = family.pipeline_latents(policy, mod.sample(policy, noise, scale))
        pipe.load_lora_weights(str(lora_dir))
        theirs = mod.reference(pipe, noise, scale, decode=False)[0]
    d, effect = diff(ours, theirs), diff(theirs, base)
    print(f"{family.name} LoRA round trip (guidance {scale}): max abs diff {d:.2e}; the adapter moves it {effect:.2e}")
    assert d <= 1e-4 and effect > family.lora_effect
