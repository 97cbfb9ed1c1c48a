"""Sampler steps: log-probs against an independent Gaussian density, reductions to the ODE, solver exactness."""

import math

import pytest
import torch

from firm.policies.samplers import (
    DPMState,
    apply_step,
    cps_coefs,
    dpm2_step,
    ode_coefs,
    sample,
    sde_coefs,
    sde_window,
    step_coefs,
)


def shifted_sigmas(n: int, shift: float = 3.0) -> torch.Tensor:
    s = torch.linspace(1.0, 1.0 / n, n, dtype=torch.float64)
    s = shift * s / (1 + (shift - 1) * s)
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]).float()


def test_sde_step_log_prob_is_the_gaussian_density_of_the_sampled_point():
    torch.manual_seed(0)
    b, shape = 3, (2, 5, 3)
    x = torch.randn(b, *shape)
    v = torch.randn(b, *shape)
    sigmas = shifted_sigmas(4)
    calls = []

    def vfn(xx, sig):
        calls.append((xx.clone(), sig.clone()))
        return v if len(calls) == 1 else torch.zeros_like(xx)

    traj = sample(vfn, x, sigmas, method="sde", noise_level=0.8, generator=torch.Generator().manual_seed(1))
    x_next = traj.latents[:, 1]
    # Independent recomputation, written from Flow-GRPO's SDE in float64 with torch.distributions.
    s, s_next = float(sigmas[0]), float(sigmas[1])
    dt = s_next - s
    sig_for_ratio = float(sigmas[1]) if s >= 1.0 else s  # Flow-GRPO's guard at sigma = 1
    std_t = 0.8 * math.sqrt(s / (1 - sig_for_ratio))
    xd, vd = x.double(), v.double()
    mean = xd * (1 + std_t**2 / (2 * s) * dt) + vd * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    dist = torch.distributions.Normal(mean, std_t * math.sqrt(-dt))
    expected = dist.log_prob(x_next.double()).reshape(b, -1).mean(1)
    torch.testing.assert_close(traj.log_probs[:, 0].double(), expected, rtol=1e-5, atol=1e-5)
    assert traj.stochastic.all() and traj.latents.shape == (b, 5, *shape)


def test_sigma_one_uses_the_second_sigma_in_the_std():
    sig, nxt = torch.tensor([1.0]), torch.tensor([0.75])
    _, _, std = sde_coefs(sig, nxt, 0.7, sigma_cap=0.75)
    assert torch.isfinite(std).all()
    assert float(std) == pytest.approx(0.7 * math.sqrt(1 / 0.25) * math.sqrt(0.25), rel=1e-6)


@pytest.mark.parametrize("method", ["sde", "cps"])
def test_noise_level_zero_is_the_euler_step(method):
    sig, nxt = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.6, 0.3, 0.0])
    cx, cv, std = step_coefs(method, sig, nxt, 0.0, sigma_cap=0.9)
    ex, ev, es = ode_coefs(sig, nxt)
    torch.testing.assert_close(cx, ex)
    torch.testing.assert_close(cv, ev)
    assert torch.equal(std, es) and torch.equal(es, torch.zeros(3))
    x, v = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(apply_step(x, v, (cx, cv, std), torch.randn(3, 4)), x + (nxt - sig)[:, None] * v)


@pytest.mark.parametrize("method", ["sde", "cps"])
def test_trajectory_with_noise_zero_equals_the_ode_trajectory(method):
    torch.manual_seed(0)
    w = torch.randn(6, 6) * 0.3
    vfn = lambda x, s: torch.tanh(x @ w) * (1 + s[:, None])  # noqa: E731 - a nonlinear velocity field
    x0 = torch.randn(4, 6)
    sigmas = shifted_sigmas(5)
    a = sample(vfn, x0, sigmas, method=method, noise_level=0.0, generator=torch.Generator().manual_seed(0))
    b = sample(vfn, x0, sigmas, method="ode")
    torch.testing.assert_close(a.latents, b.latents)
    assert not a.stochastic.any() and torch.equal(a.log_probs, torch.zeros_like(a.log_probs))


def test_cps_preserves_the_noise_level():
    # With the exact velocity of x = (1 - s) x0 + s n, the CPS mean is (1 - s') x0 + sqrt(s'^2 - std^2) n: the
    # noise coefficient after adding std * eps is exactly s' (in variance).
    s, s_next = torch.tensor([0.8]), torch.tensor([0.5])
    cx, cv, std = cps_coefs(s, s_next, 0.6)
    x0, n = torch.randn(1, 10), torch.randn(1, 10)
    x = (1 - s) * x0 + s * n
    mean = apply_step(x, n - x0, (cx, cv, std))
    keep = torch.sqrt(s_next**2 - std**2)
    torch.testing.assert_close(mean, (1 - s_next) * x0 + keep * n)
    torch.testing.assert_close(keep**2 + std**2, s_next**2)


def test_exact_velocity_lands_on_the_data_point_for_every_solver():
    x0 = torch.randn(2, 8)
    vfn = lambda x, s: (x - x0) / s[:, None]  # noqa: E731 - the exact flow towards x0
    noise = torch.randn(2, 8)
    for method in ("ode", "dpm2"):
        traj = sample(vfn, noise, shifted_sigmas(6), method=method)
        torch.testing.assert_close(traj.final, x0, rtol=1e-4, atol=1e-4)


def test_dpm2_first_order_step_is_euler():
    x, v = torch.randn(3, 4), torch.randn(3, 4)
    out, state = dpm2_step(x, v, 0.7, 0.4, DPMState())
    torch.testing.assert_close(out, x + (0.4 - 0.7) * v)
    assert state.x0 is not None and state.h is not None


def test_dpm2_is_more_accurate_than_euler():
    # Gaussian data N(m, c^2): the exact flow maps the noise n to m + c * n, and its velocity is known in closed form.
    # At 32 steps Euler (first order) is ~4x less accurate than DPM-Solver++(2M) (second order).
    m, c = 1.0, 0.3

    def vfn(x, s):
        s = s[:, None]
        x0_hat = m + (1 - s) * c**2 / ((1 - s) ** 2 * c**2 + s**2) * (x - (1 - s) * m)
        return (x - x0_hat) / s

    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64).float()
    exact = m + c * noise
    coarse = shifted_sigmas(32, 3.0)
    err = {k: float((sample(vfn, noise, coarse, method=k).final - exact).abs().max()) for k in ("ode", "dpm2")}
    assert err["dpm2"] < 0.5 * err["ode"], err


def test_sde_window_is_consecutive_and_seeded():
    a = sde_window(10, 3, None, torch.Generator().manual_seed(5))
    b = sde_window(10, 3, None, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and int(a.sum()) == 3
    idx = a.nonzero().flatten()
    assert (idx[1:] - idx[:-1] == 1).all()
    assert sde_window(10, 0, None, None).all()
    assert int(sde_window(10, 2, 0, torch.Generator().manual_seed(1)).nonzero()[0]) == 0


def test_window_steps_carry_log_probs_others_do_not():
    vfn = lambda x, s: -x  # noqa: E731
    window = torch.tensor([False, True, True, False])
    traj = sample(
        vfn,
        torch.randn(2, 3),
        shifted_sigmas(4),
        method="sde",
        stochastic=window,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(traj.stochastic, window)
    assert (traj.log_probs[:, ~window] == 0).all() and (traj.log_probs[:, window] != 0).all()


def test_cps_last_step_is_deterministic():
    traj = sample(
        lambda x, s: -x,
        torch.randn(2, 3),
        shifted_sigmas(3),
        method="cps",
        noise_level=0.5,
        generator=torch.Generator().manual_seed(0),
    )
    assert traj.stochastic.tolist() == [True, True, False]


def test_bad_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="decrease strictly to 0"):
        sample(lambda x, s: x, torch.randn(1, 2), torch.tensor([1.0, 0.5, 0.6, 0.0]), method="ode")
    with pytest.raises(ValueError, match="unknown sampler method"):
        sample(lambda x, s: x, torch.randn(1, 2), shifted_sigmas(2), method="heun")
