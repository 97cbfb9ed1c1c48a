"""Parity of every algorithm's math with its reference implementation, on the same random inputs.

Each ``ref_*`` function below is the reference's formula transcribed in our own words (plain torch, float64), with
the file and function it comes from. FIRM's own code path (the functions the algorithms call in training) must agree
to float32 precision. Where FIRM keeps a second form on purpose (``kl_form: step_variance``, ``log_prob: gaussian``
for CPS), a test pins how far it is from the reference, so that the documented factors stay true.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from firm import kernels
from firm.algorithms.base import ema_decay
from firm.algorithms.diffusion_nft import DiffusionNFT, DiffusionNFTConfig, old_policy_decay
from firm.algorithms.flow_grpo import StepTerms, step_mean_kl
from firm.algorithms.grpo_guard import GRPOGuard, GRPOGuardConfig, guard_loss
from firm.algorithms.mix_grpo import MixGRPOConfig, window_start
from firm.policies.samplers import apply_step, cps_coefs, sample, sde_coefs, step_log_prob

B, SHAPE = 5, (4, 6, 6)


def sd3_sigmas(n: int, shift: float = 3.0) -> torch.Tensor:
    """SD3's sampling schedule: diffusers' FlowMatchEulerDiscreteScheduler(shift=3) with n steps, ending at 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(n)
    return sched.sigmas.double()


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, v, v_ref, eps = (torch.randn(B, *SHAPE, generator=g, dtype=torch.float64) for _ in range(4))
    return x, v, 0.9 * v + 0.1 * v_ref, eps


def batch(x: float) -> torch.Tensor:
    return torch.full((B,), float(x), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------- references


def ref_flow_grpo_sde_step(v, x, sigma, sigma_prev, sigma_max, noise_level, eps):
    """flow_grpo/diffusers_patch/sd3_sde_with_logprob.py, ``sde_step_with_logprob`` (sde_type "sde")."""
    dt = sigma_prev - sigma
    std_dev_t = math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma))) * noise_level
    mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    step_std = std_dev_t * math.sqrt(-dt)
    prev = mean + step_std * eps
    lp = -((prev - mean) ** 2) / (2 * step_std**2) - math.log(step_std) - math.log(math.sqrt(2 * math.pi))
    return prev, lp.reshape(B, -1).mean(1), mean, std_dev_t


def ref_flow_grpo_cps_step(v, x, sigma, sigma_prev, noise_level, eps):
    """flow_grpo/diffusers_patch/sd3_sde_with_logprob.py, ``sde_step_with_logprob`` (sde_type "cps")."""
    std_dev_t = sigma_prev * math.sin(noise_level * math.pi / 2)
    x0_hat = x - sigma * v
    x1_hat = x + v * (1 - sigma)
    mean = x0_hat * (1 - sigma_prev) + x1_hat * math.sqrt(sigma_prev**2 - std_dev_t**2)
    prev = mean + std_dev_t * eps
    lp = -((prev - mean) ** 2)  # the constants are removed on purpose there
    return prev, lp.reshape(B, -1).mean(1), mean, std_dev_t


def ref_flow_grpo_kl(mean, mean_ref, std_dev_t):
    """flow_grpo/scripts/train_sd3.py, the inner loop: ``kl_loss`` per sample (before its batch mean)."""
    return ((mean - mean_ref) ** 2).reshape(B, -1).mean(1) / (2 * std_dev_t**2)


def ref_flow_grpo_policy_loss(logp, logp_old, adv, clip_range):
    """flow_grpo/scripts/train_sd3.py: ratio, unclipped / clipped loss, their maximum averaged over the batch."""
    ratio = torch.exp(logp - logp_old)
    return torch.mean(torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)))


def ref_per_prompt_advantages(prompts, rewards, global_std):
    """flow_grpo/stat_tracking.py, ``PerPromptStatTracker.update`` (one step, empty history)."""
    prompts, rewards = np.array(prompts), np.array(rewards, dtype=np.float64)
    adv = np.zeros_like(rewards)
    for p in np.unique(prompts):
        mine = rewards[prompts == p]
        std = (np.std(rewards) if global_std else np.std(mine)) + 1e-4
        adv[prompts == p] = (mine - np.mean(mine)) / std
    return adv


def ref_nft_loss(v, v_old, v_ref, xt, x0, t, adv, beta, adv_clip_max, kl_weight):
    """DiffusionNFT/scripts/train_nft_sd3.py, the training loop: r, implicit policies, adaptive weights, KL."""
    r = torch.clamp((torch.clamp(adv, -adv_clip_max, adv_clip_max) / adv_clip_max) / 2.0 + 0.5, 0, 1)
    te = t.view(-1, 1, 1, 1)
    pos = beta * v + (1 - beta) * v_old
    neg = (1.0 + beta) * v_old - beta * v
    dims = tuple(range(1, x0.ndim))
    x0_pos, x0_neg = xt - te * pos, xt - te * neg
    with torch.no_grad():  # the adaptive weights are constants there
        w_pos = torch.abs(x0_pos - x0).mean(dim=dims, keepdim=True).clip(min=0.00001)
        w_neg = torch.abs(x0_neg - x0).mean(dim=dims, keepdim=True).clip(min=0.00001)
    loss_pos = ((x0_pos - x0) ** 2 / w_pos).mean(dim=dims)
    loss_neg = ((x0_neg - x0) ** 2 / w_neg).mean(dim=dims)
    policy = ((r * loss_pos / beta + (1.0 - r) * loss_neg / beta) * adv_clip_max).mean()
    return policy + kl_weight * ((v - v_ref) ** 2).mean(dim=dims).mean()


def ref_nft_decay(step, decay_type):
    """DiffusionNFT/scripts/train_nft_sd3.py, ``return_decay``."""
    flat, uprate, uphold = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}[decay_type]
    return 0.0 if step < flat else min((step - flat) * uprate, uphold)


def ref_ema_decay(step, decay):
    """DiffusionNFT/flow_grpo/ema.py, ``EMAModuleWrapper.get_current_decay``."""
    return min((1 + step) / (10 + step), decay)


def ref_grpo_guard_loss(logp, logp_old, mean, mean_old, std_dev_t, dt, adv, clip_range):
    """GRPO-Guard as VeRL-Omni's ``grpo_guard`` loss mode writes it (docs algo/grpo_guard.md): bias b_t, RatioNorm
    ratio, clipped loss scaled by 1 / (sqrt(-dt))^2 (per sample, before the batch mean)."""
    step_std = math.sqrt(-dt) * std_dev_t
    b = ((mean - mean_old) ** 2).reshape(B, -1).mean(1) / (2 * step_std**2)
    ratio = torch.exp((logp - logp_old + b) * step_std)
    clipped = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_range, 1 + clip_range))
    return clipped / math.sqrt(-dt) ** 2, ratio


def ref_nft_dpm2_trajectory(v_fn, z, sigmas):
    """DiffusionNFT/flow_grpo/diffusers_patch/solver.py, ``run_sampling(solver="dpm2", determistic=True)``:
    ``dpm_step`` with its ``DPMState`` (DDIM on the first and last steps, first-order DPM-Solver while the history is
    short, multistep second order after), in float64."""
    n = sigmas.numel() - 1
    outputs, lower = [None, None], 0
    lam = lambda s: torch.log(1 - s) - torch.log(s)  # noqa: E731 - lambda_t = log(alpha_t) - log(sigma_t)
    for i in range(n):
        s, t = sigmas[i], sigmas[i + 1]
        x0 = z - s * v_fn(z, s)  # convert_model_output
        outputs = [outputs[1], x0]
        final = i == n - 1
        if lower < 1 or final:
            if i == 0 or final:  # ddim_update with eta 0
                z = (1 - t) * x0 + t * (z - (1 - s) * x0) / s
            else:  # dpm_solver_first_order_update
                h = lam(t) - lam(s)
                z = (t / s) * z - (1 - t) * (torch.exp(-h) - 1.0) * x0
        else:  # multistep_dpm_solver_second_order_update
            s1 = sigmas[i - 1]
            h, h0 = lam(t) - lam(s), lam(s) - lam(s1)
            d1 = (1.0 / (h0 / h)) * (outputs[1] - outputs[0])
            e = (1 - t) * (torch.exp(-h) - 1.0)
            z = (t / s) * z - e * outputs[1] - 0.5 * e * d1
        lower = min(lower + 1, 2)
    return z


# ---------------------------------------------------------------------------------------------------- the tests

SIGMAS = sd3_sigmas(10)
STEPS = [0, 7, 8]  # the first (sigma = 1) and the steps docs/rl.md quotes, of SD3's shift-3, 10-step schedule


@pytest.mark.parametrize("i", STEPS)
def test_sde_step_mean_std_and_log_prob_match_flow_grpo(i):
    x, v, _, eps = inputs(i)
    s, s_prev, s_max = float(SIGMAS[i]), float(SIGMAS[i + 1]), float(SIGMAS[1])
    prev, lp, mean, std_dev_t = ref_flow_grpo_sde_step(v, x, s, s_prev, s_max, 0.7, eps)
    coefs = sde_coefs(batch(s), batch(s_prev), 0.7, sigma_cap=s_max)
    ours_prev = apply_step(x.float(), v.float(), coefs, eps.float())
    torch.testing.assert_close(ours_prev.double(), prev, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(apply_step(x.float(), v.float(), coefs).double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(coefs[2].double(), torch.full((B,), std_dev_t * math.sqrt(s - s_prev)).double())
    ours_lp, _ = step_log_prob("gaussian", x.float(), v.float(), prev.float(), coefs)
    torch.testing.assert_close(ours_lp.double(), lp, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("i", STEPS)
def test_cps_step_and_constant_free_log_prob_match_flow_grpo(i):
    x, v, _, eps = inputs(10 + i)
    s, s_prev = float(SIGMAS[i]), float(SIGMAS[i + 1])
    prev, lp, mean, std_dev_t = ref_flow_grpo_cps_step(v, x, s, s_prev, 0.7, eps)
    coefs = cps_coefs(batch(s), batch(s_prev), 0.7)
    torch.testing.assert_close(apply_step(x.float(), v.float(), coefs).double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(coefs[2].double(), torch.full((B,), std_dev_t, dtype=torch.float64))
    ours, _ = step_log_prob("residual", x.float(), v.float(), prev.float(), coefs)  # FIRM's CPS default
    torch.testing.assert_close(ours.double(), lp, rtol=1e-4, atol=1e-6)
    # the Gaussian form FIRM used before is residual / (2 std^2) plus constants: log-ratios 1 / (2 std^2) times larger
    gauss, _ = step_log_prob("gaussian", x.float(), v.float(), prev.float(), coefs)
    std = torch.full((B,), std_dev_t, dtype=torch.float64)
    expected_gauss = lp / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(gauss.double(), expected_gauss, rtol=1e-4, atol=1e-4)


# sde also at the last step (9, sigma 0.009 -> 0), where the old KL was 112x Flow-GRPO's; CPS is deterministic there
@pytest.mark.parametrize("i,method", [(i, "sde") for i in (*STEPS, 9)] + [(i, "cps") for i in STEPS])
def test_kl_of_step_means_matches_flow_grpo(i, method):
    x, v, v_ref, eps = inputs(20 + i)
    s, s_prev, s_max = float(SIGMAS[i]), float(SIGMAS[i + 1]), float(SIGMAS[1])
    if method == "sde":
        _, _, mean, std_dev_t = ref_flow_grpo_sde_step(v, x, s, s_prev, s_max, 0.7, eps)
        _, _, mean_ref, _ = ref_flow_grpo_sde_step(v_ref, x, s, s_prev, s_max, 0.7, eps)
        coefs = sde_coefs(batch(s), batch(s_prev), 0.7, sigma_cap=s_max)
    else:
        _, _, mean, std_dev_t = ref_flow_grpo_cps_step(v, x, s, s_prev, 0.7, eps)
        _, _, mean_ref, _ = ref_flow_grpo_cps_step(v_ref, x, s, s_prev, 0.7, eps)
        coefs = cps_coefs(batch(s), batch(s_prev), 0.7)
    expected = ref_flow_grpo_kl(mean, mean_ref, std_dev_t)
    _, sq = kernels.step_log_prob(x.float(), v.float(), x.float(), *coefs, ref_velocity=v_ref.float())
    ours = step_mean_kl(method, batch(s), batch(s_prev), coefs, sq)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-7)
    full = step_mean_kl(method, batch(s), batch(s_prev), coefs, sq, form="step_variance")
    factor = 1.0 / (s - s_prev) if method == "sde" else 1.0  # the old FIRM KL was 1 / |dt| times Flow-GRPO's on sde
    torch.testing.assert_close((full / ours).double(), torch.full((B,), factor, dtype=torch.float64), rtol=1e-4, atol=0)


def test_ratio_and_clipped_surrogate_match_flow_grpo():
    g = torch.Generator().manual_seed(3)
    logp_old = torch.randn(64, generator=g, dtype=torch.float64)
    logp = logp_old + 3e-4 * torch.randn(64, generator=g, dtype=torch.float64)  # some inside, some outside the clip
    adv = torch.randn(64, generator=g, dtype=torch.float64)
    expected = ref_flow_grpo_policy_loss(logp, logp_old, adv, 1e-4)
    lp = logp.float().requires_grad_()
    out = kernels.clipped_surrogate(lp, logp_old.float(), adv.float(), 1e-4)
    torch.testing.assert_close(out.loss.mean().double(), expected, rtol=1e-5, atol=1e-7)
    ratio = torch.exp(logp - logp_old)
    assert ((ratio - 1).abs() > 1e-4).any() and ((ratio - 1).abs() < 1e-4).any()  # both regimes are exercised
    lr = logp.clone().requires_grad_()
    ref_flow_grpo_policy_loss(lr, logp_old, adv, 1e-4).backward()
    out.loss.mean().backward()
    torch.testing.assert_close(lp.grad.double(), lr.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("global_std", [False, True])
def test_group_advantages_match_flow_grpo_per_prompt_stat_tracker(global_std):
    g = torch.Generator().manual_seed(4)
    groups = torch.arange(6).repeat_interleave(4)[torch.randperm(24, generator=g)]  # interleaved groups of 4
    rewards = torch.rand(24, generator=g, dtype=torch.float64)
    expected = ref_per_prompt_advantages([f"p{i}" for i in groups.tolist()], rewards.numpy(), global_std)
    ours = kernels.group_advantages(
        rewards.float(), groups, scale="batch" if global_std else "group", eps=1e-4, clip=1e9
    )
    np.testing.assert_allclose(ours.double().numpy(), expected, rtol=1e-5, atol=1e-5)
    assert np.abs(expected).sum() > 1


def test_nft_loss_and_gradient_match_diffusion_nft():
    g = torch.Generator().manual_seed(5)
    v, v_old, v_ref, xt, x0 = (torch.randn(B, *SHAPE, generator=g, dtype=torch.float64) for _ in range(5))
    t = torch.rand(B, generator=g, dtype=torch.float64) * 0.9 + 0.05
    adv = torch.randn(B, generator=g, dtype=torch.float64) * 4
    for beta in (1.0, 0.1):
        vr = v.clone().requires_grad_()
        ref_nft_loss(vr, v_old, v_ref, xt, x0, t, adv, beta, 5.0, 1e-4).backward()
        r = (adv.clamp(-5, 5) / 5 / 2 + 0.5).clamp(0, 1)  # what DiffusionNFT.begin_epoch hands the kernel
        vo = v.float().requires_grad_()
        loss, _ = kernels.nft_loss(
            vo, v_old.float(), v_ref.float(), xt.float(), x0.float(), t.float(), r.float(), beta=beta, kl_beta=1e-4
        )
        loss.backward()
        expected = ref_nft_loss(v, v_old, v_ref, xt, x0, t, adv, beta, 5.0, 1e-4)
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(vo.grad.double(), vr.grad, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize(
    "decay_type,settings", [(1, {}), (2, {"old_decay_start": 75, "old_decay_rate": 0.0075, "old_decay_max": 0.999})]
)
def test_old_policy_decay_matches_diffusion_nft(decay_type, settings):
    cfg = DiffusionNFTConfig(**settings)
    cfg.validate()
    nft = DiffusionNFT.__new__(DiffusionNFT)  # the method reads only its config
    nft.config = cfg
    for step in [0, 1, 10, 74, 75, 76, 200, 499, 500, 501, 5000]:
        expected = ref_nft_decay(step, decay_type)
        assert nft.old_decay(step) == pytest.approx(expected, abs=1e-12), step
        rate, top, start = cfg.old_decay_rate, cfg.old_decay_max, cfg.old_decay_start
        assert old_policy_decay(step, rate, top, start) == pytest.approx(expected, abs=1e-12), step


def test_ema_warmup_matches_diffusion_nft():
    # the decay RLAlgorithm.apply_optimizer_step uses at optimizer step n
    for n in [0, 1, 5, 80, 1000]:
        assert ema_decay(n, 0.9) == pytest.approx(ref_ema_decay(n, 0.9), abs=1e-15), n
        assert ema_decay(n, 0.9, warmup=False) == 0.9
    assert ema_decay(0, 0.9) == pytest.approx(0.1) and ema_decay(1000, 0.9) == 0.9


@pytest.mark.parametrize("i", STEPS[1:])  # sigma < 1: RatioNorm needs a finite std_dev_t
def test_grpo_guard_ratio_and_loss_match_the_reference(i):
    x, v, v_old, eps = inputs(30 + i)
    s, s_prev, s_max = float(SIGMAS[i]), float(SIGMAS[i + 1]), float(SIGMAS[1])
    prev, lp_old, mean_old, std_dev_t = ref_flow_grpo_sde_step(v_old, x, s, s_prev, s_max, 0.7, eps)
    _, _, mean, _ = ref_flow_grpo_sde_step(v, x, s, s_prev, s_max, 0.7, eps)
    step_std = std_dev_t * math.sqrt(s - s_prev)
    lp = -((prev - mean) ** 2) / (2 * step_std**2) - math.log(step_std) - 0.5 * math.log(2 * math.pi)
    lp = lp.reshape(B, -1).mean(1)
    adv = torch.linspace(-2, 2, B, dtype=torch.float64)
    expected, ratio_ref = ref_grpo_guard_loss(lp, lp_old, mean, mean_old, std_dev_t, s_prev - s, adv, 1e-2)
    coefs = sde_coefs(batch(s), batch(s_prev), 0.7, sigma_cap=s_max)
    ours_lp, _ = step_log_prob("gaussian", x.float(), v.float(), prev.float(), coefs)
    ours_mean = apply_step(x.float(), v.float(), coefs)
    loss, ratio = guard_loss(
        ours_lp, lp_old.float(), ours_mean, mean_old.float(), coefs[2], batch(s_prev - s), adv.float(), 1e-2
    )
    torch.testing.assert_close(ratio.double(), ratio_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-3, atol=1e-4)
    # RatioNorm is exp(-mean(eps * (mu_old - mu))): the bias is gone, so the ratio is centred on 1
    centred = torch.exp(-(eps * (mean_old - mean)).reshape(B, -1).mean(1))
    torch.testing.assert_close(ratio.double(), centred, rtol=1e-4, atol=1e-5)
    # and the algorithm's surrogate is wired to it: after an optimizer step it uses the recorded mu_old and logp_old
    guard = GRPOGuard.__new__(GRPOGuard)  # surrogate reads only its config and the on-policy flag
    guard.config, guard._fresh = GRPOGuardConfig(clip_range=1e-2), False
    zero = torch.zeros(B)
    terms = StepTerms(
        ours_lp, lp_old.float(), lp_old.float(), zero, coefs[2], batch(s_prev - s), ours_mean, mean_old.float()
    )
    wired, _ = guard.surrogate(terms, adv.float())
    torch.testing.assert_close(wired.double(), expected, rtol=1e-3, atol=1e-4)
    guard._fresh = True  # before any optimizer step of the RL step: ratio exactly 1, whatever was recorded
    _, ratio_fresh = guard.surrogate(terms, adv.float())
    assert torch.equal(ratio_fresh, torch.ones(B))


def test_mix_grpo_window_slides_as_the_paper_says():
    # MixGRPO, Algorithm 1 (progressive): l <- min(l + s, T - w) every tau iterations; T = 25, w = 4, s = 1, tau = 25
    c = MixGRPOConfig()
    c.sampler.num_steps = 25
    c.validate()
    starts = [window_start(k, 25, c) for k in range(0, 25 * 30, 25)]
    assert starts[:4] == [0, 1, 2, 3] and starts[21:] == [21] * 9  # stops at T - w = 21
    assert [window_start(k, 25, c) for k in (0, 24, 25, 49, 50)] == [0, 0, 1, 1, 2]
    c.wrap = True
    assert window_start(25 * 22, 25, c) == 0  # wraps back to the start after 21


@pytest.mark.parametrize("n", [4, 6, 10])
def test_dpm2_trajectory_matches_diffusion_nft(n):
    """FIRM's DiffusionNFT rollout sampler against DiffusionNFT's solver on SD3's schedule, with a velocity that
    depends on the sample and the noise level (so every order of the solver shows)."""
    g = torch.Generator().manual_seed(40 + n)
    z0 = torch.randn(B, *SHAPE, generator=g, dtype=torch.float64)
    target = torch.randn(B, *SHAPE, generator=g, dtype=torch.float64)

    def v_fn(x, s):  # a smooth field: towards `target`, bending with the noise level
        s = torch.as_tensor(s, dtype=torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
        return (x - target) / s.clamp_min(1e-3) * (0.5 + 0.5 * s)

    sig = sd3_sigmas(n)
    expected = ref_nft_dpm2_trajectory(v_fn, z0, sig)
    traj = sample(lambda x, s: v_fn(x.double(), s).float(), z0.float(), sig.float(), method="dpm2", record=False)
    torch.testing.assert_close(traj.final.double(), expected, rtol=1e-4, atol=1e-4)
    euler = sample(lambda x, s: v_fn(x.double(), s).float(), z0.float(), sig.float(), method="ode", record=False)
    assert (euler.final.double() - expected).abs().max() > 1e-3  # the test tells the solvers apart
