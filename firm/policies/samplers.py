"""Flow-matching samplers with log-probabilities, as plain functions.

Convention (rectified flow, as in diffusers' ``FlowMatchEulerDiscreteScheduler``): ``x_sigma = (1 - sigma) x0 +
sigma * noise``, the model predicts the velocity ``v = noise - x0``, and sampling walks ``sigma`` from ~1 down to 0.
With ``dt = sigma_next - sigma < 0`` every stochastic step is Gaussian::

    x_next ~ N(coef_x * x + coef_v * v, std^2)

and the step functions below return these per-sample coefficients, which is what ``firm.kernels.step_log_prob`` takes.

* **Euler ODE**: ``coef_x = 1``, ``coef_v = dt``, ``std = 0``.
* **Flow-GRPO SDE**: ``s_t = noise_level * sqrt(sigma / (1 - sigma))``;
  ``coef_x = 1 + s_t^2 dt / (2 sigma)``, ``coef_v = (1 + s_t^2 (1 - sigma) / (2 sigma)) dt``, ``std = s_t sqrt(-dt)``.
  At ``sigma = 1`` the ratio is infinite; like Flow-GRPO we use the schedule's second sigma (``sigma_cap``) there.
* **CPS** (coefficients-preserving): ``std = sigma_next * sin(noise_level * pi / 2)``; the mean re-noises the x0
  prediction ``x - sigma v`` to ``sigma_next`` with the noise estimate ``x + (1 - sigma) v`` scaled by
  ``sqrt(sigma_next^2 - std^2)``, so the marginal noise level is exactly ``sigma_next``.
* **DPM-Solver++(2M)**: a deterministic second-order multistep solver in the x0 parameterisation (one model call per
  step, used for DiffusionNFT rollouts); its first step equals the Euler step.

With ``noise_level = 0`` the SDE and CPS steps are the Euler step. :func:`sample` runs a whole trajectory, with an
optional SDE window (stochastic steps on a subset, deterministic steps elsewhere, by Euler or DPM-Solver++(2M)), and
records what training needs.

**One table of methods.** :data:`SAMPLERS` maps each method name to a :class:`SamplerMethod`: whether it is
stochastic, its coefficient function, its default log-prob form and the std that Flow-GRPO's KL of step means
divides by. Everything else (configs, algorithms, evaluation) asks this table instead of spelling out name sets.

**Log-prob forms** (:func:`step_log_prob`):

* ``gaussian``: the full Gaussian log-density averaged over latent dims, ``mean(-(x' - mu)^2 / (2 std^2)) - log std
  - log sqrt(2 pi)`` (Flow-GRPO's ``sde_step_with_logprob`` for ``sde``).
* ``residual``: ``mean(-(x' - mu)^2)``, the constants and the ``1 / (2 std^2)`` factor left out on purpose, as
  Flow-GRPO's CPS branch does (flow_grpo/diffusers_patch/sd3_sde_with_logprob.py, ``sde_type == "cps"``). The
  ratio ``exp(logp - logp_old)`` is then ``2 std^2`` times flatter than the Gaussian one, which is what Flow-GRPO's
  CPS clip range is tuned for.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from firm import kernels

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B, ...), sigma (B,)) -> v (B, ...)


def _as_batch(x: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float32, device=like.device).expand(like.shape[0]).contiguous()


# --------------------------------------------------------------------------------------------------------------------
# Per-step coefficients: each returns (coef_x, coef_v, std), float32 (B,)


def ode_coefs(sigma: torch.Tensor, sigma_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Euler step ``x + dt * v`` as (coef_x, coef_v, std=0). ``sigma``, ``sigma_next``: (B,) float32."""
    dt = sigma_next - sigma
    return torch.ones_like(sigma), dt, torch.zeros_like(sigma)


def sde_coefs(
    sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float, sigma_cap: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flow-GRPO SDE step coefficients.

    Args:
        sigma, sigma_next: (B,) float32 noise levels of this step (``sigma_next < sigma``).
        noise_level: the SDE noise scale ``a`` in ``std_t = a * sqrt(sigma / (1 - sigma))``.
        sigma_cap: replaces ``sigma`` in ``1 - sigma`` where ``sigma >= 1`` (the schedule's second sigma).
    """
    dt = sigma_next - sigma
    denom = 1.0 - torch.where(sigma >= 1.0, torch.full_like(sigma, sigma_cap), sigma)
    std_t = noise_level * torch.sqrt(sigma / denom)
    coef_x = 1.0 + std_t**2 / (2.0 * sigma) * dt
    coef_v = (1.0 + std_t**2 * (1.0 - sigma) / (2.0 * sigma)) * dt
    std = std_t * torch.sqrt(-dt)
    return coef_x, coef_v, std


def cps_coefs(
    sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coefficients-preserving step: mean ``(x - sigma v)(1 - s') + (x + (1 - sigma) v) sqrt(s'^2 - std^2)``."""
    std = sigma_next * math.sin(noise_level * math.pi / 2)
    keep = torch.sqrt((sigma_next**2 - std**2).clamp_min(0.0))
    coef_x = (1.0 - sigma_next) + keep
    coef_v = -sigma * (1.0 - sigma_next) + (1.0 - sigma) * keep
    return coef_x, coef_v, std


def _ode_coefs4(sigma, sigma_next, noise_level, sigma_cap):  # noqa: ARG001 - the table's common signature
    return ode_coefs(sigma, sigma_next)


def _cps_coefs4(sigma, sigma_next, noise_level, sigma_cap):  # noqa: ARG001
    return cps_coefs(sigma, sigma_next, noise_level)


def _sde_kl_std(std: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    return std / torch.sqrt(-dt)  # Flow-GRPO's std_dev_t = noise_level * sqrt(sigma / (1 - sigma)), without sqrt(-dt)


def _cps_kl_std(std: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:  # noqa: ARG001
    return std  # Flow-GRPO's CPS branch returns the whole step std as std_dev_t


CoefFn = Callable[[torch.Tensor, torch.Tensor, float, float], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class SamplerMethod:
    """One sampler method: what every caller needs to know about it.

    Attributes:
        name: the YAML name (``module.sampler.method``).
        stochastic: its steps draw noise and carry a log-prob (a policy-gradient algorithm can train on them).
        coefs: ``(sigma, sigma_next, noise_level, sigma_cap) -> (coef_x, coef_v, std)`` of one step; for a multistep
            solver, the coefficients of its first (Euler) step.
        log_prob: the default log-prob form of its steps (``gaussian`` | ``residual``; see the module docstring).
        kl_std: ``(std, dt) -> s`` such that Flow-GRPO's KL of step means is ``mean((mu - mu_ref)^2) / (2 s^2)``.
        multistep: a multistep deterministic solver (DPM-Solver++(2M)) that carries state between steps.
    """

    name: str
    stochastic: bool
    coefs: CoefFn
    log_prob: str = "gaussian"
    kl_std: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    multistep: bool = False


SAMPLERS: dict[str, SamplerMethod] = {
    "sde": SamplerMethod("sde", True, sde_coefs, "gaussian", _sde_kl_std),
    "cps": SamplerMethod("cps", True, _cps_coefs4, "residual", _cps_kl_std),
    "ode": SamplerMethod("ode", False, _ode_coefs4),
    "dpm2": SamplerMethod("dpm2", False, _ode_coefs4, multistep=True),
}
LOG_PROB_FORMS = ("gaussian", "residual")
DETERMINISTIC_SOLVERS = tuple(n for n, m in SAMPLERS.items() if not m.stochastic)  # ("ode", "dpm2")


def sampler_method(name: str) -> SamplerMethod:
    """The :class:`SamplerMethod` called ``name``; a clear error naming the known ones otherwise."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler method {name!r}; one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def step_coefs(
    method: str, sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float, sigma_cap: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coefficients ``(coef_x, coef_v, std)`` of one step of ``method`` (Euler for the deterministic ones)."""
    return sampler_method(method).coefs(sigma, sigma_next, noise_level, sigma_cap)


def kl_std(method: str, sigma: torch.Tensor, sigma_next: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B,) the std Flow-GRPO's KL of step means divides by (``2 s^2``) for a stochastic ``method``."""
    m = sampler_method(method)
    if m.kl_std is None:
        raise ValueError(f"sampler method {method!r} is deterministic: it has no step distribution to take a KL of")
    return m.kl_std(std, sigma_next - sigma)


_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def step_log_prob(
    form: str,
    sample: torch.Tensor,
    velocity: torch.Tensor,
    next_sample: torch.Tensor,
    coefs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ref_velocity: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B,) log-prob of ``next_sample`` under one step, in the given form, and (B,) ``mean((v - v_ref)^2)``.

    Both forms come from one fused ``firm.kernels.step_log_prob`` pass (float32). ``residual`` is the Gaussian form with
    its normalisers added back and the ``1 / (2 std^2)`` factor multiplied out: ``mean(-(x' - mu)^2)``.
    """
    logp, sq = kernels.step_log_prob(sample, velocity, next_sample, *coefs, ref_velocity=ref_velocity)
    if form == "gaussian":
        return logp, sq
    if form == "residual":
        std = coefs[2].to(logp.dtype)
        return (logp + torch.log(std) + _HALF_LOG_2PI) * (2.0 * std * std), sq
    raise ValueError(f"unknown log-prob form {form!r}; one of {LOG_PROB_FORMS}")


def _bcast(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return c.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, ..., 1)


def apply_step(
    sample: torch.Tensor,
    velocity: torch.Tensor,
    coefs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """``coef_x * x + coef_v * v (+ std * noise)``, with per-sample coefficients broadcast over latent dims."""
    coef_x, coef_v, std = coefs
    out = _bcast(coef_x, sample) * sample + _bcast(coef_v, sample) * velocity
    if noise is not None:
        out = out + _bcast(std, sample) * noise
    return out


@dataclass
class DPMState:
    """What DPM-Solver++(2M) carries from one step to the next."""

    x0: torch.Tensor | None = None  # previous x0 prediction (B, ...)
    h: float | None = None  # previous log-SNR step


def _lambda(sigma: float) -> float:
    return math.log((1.0 - sigma) / sigma)


def dpm2_step(
    sample: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float, state: DPMState
) -> tuple[torch.Tensor, DPMState]:
    """One DPM-Solver++(2M) step for flow matching (alpha = 1 - sigma). First and last steps are first order.

    The first-order update ``(s'/s) x - (1 - s')(e^{-h} - 1) x0`` is exactly the Euler step.
    """
    x0 = sample - sigma * velocity
    if sigma_next <= 0.0:
        return x0, DPMState(x0, None)
    # sigma may be exactly 1 at the first step (lambda = -inf): first order is then the Euler step.
    if sigma >= 1.0:
        return sample + (sigma_next - sigma) * velocity, DPMState(x0, None)
    h = _lambda(sigma_next) - _lambda(sigma)
    d = x0
    if state.x0 is not None and state.h is not None and state.h > 0:
        r = state.h / h
        d = (1.0 + 1.0 / (2.0 * r)) * x0 - (1.0 / (2.0 * r)) * state.x0
    out = (sigma_next / sigma) * sample - (1.0 - sigma_next) * math.expm1(-h) * d
    return out, DPMState(x0, h)


# --------------------------------------------------------------------------------------------------------------------
# Whole trajectories


@dataclass
class Trajectory:
    """A sampled trajectory; what Flow-GRPO trains on (and DiffusionNFT's final ``x0``).

    Attributes:
        latents: (B, T + 1, ...) every latent from the initial noise (index 0) to the final sample (index T).
        log_probs: (B, T) float32 log-prob of each step's observed next latent; 0 on deterministic steps.
        sigmas: (T + 1,) float32 noise levels of the schedule (``sigmas[T] == 0``).
        stochastic: (T,) bool, which steps were sampled stochastically (and carry a log-prob).
        sigma_cap: the value used for ``sigma = 1`` in the SDE std (the schedule's second sigma).
        means: (B, T, ...) the mean of each stochastic step (0 elsewhere), when asked for (``record_means``).
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    sigmas: torch.Tensor
    stochastic: torch.Tensor
    sigma_cap: float
    means: torch.Tensor | None = None

    @property
    def final(self) -> torch.Tensor:
        """(B, ...) the final sample."""
        return self.latents[:, -1]

    @property
    def num_steps(self) -> int:
        return self.sigmas.numel() - 1


def sde_window(
    num_steps: int, window_size: int, start_max: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """(T,) bool mask of stochastic steps: all steps when ``window_size <= 0``, else a window of ``window_size``
    consecutive steps starting uniformly in ``[0, min(start_max, T - window_size)]``."""
    mask = torch.zeros(num_steps, dtype=torch.bool)
    if window_size <= 0 or window_size >= num_steps:
        mask[:] = True
        return mask
    hi = num_steps - window_size if start_max is None else min(start_max, num_steps - window_size)
    start = int(torch.randint(0, hi + 1, (1,), generator=generator)) if hi > 0 else 0
    mask[start : start + window_size] = True
    return mask


@torch.no_grad()
def sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    method: str = "sde",
    noise_level: float = 0.7,
    stochastic: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    record: bool = True,
    deterministic: str = "ode",
    log_prob: str | None = None,
    record_means: bool = False,
) -> Trajectory:
    """Sample from ``noise`` along ``sigmas`` with the given method.

    Args:
        velocity_fn: ``(x (B, ...), sigma (B,)) -> v (B, ...)``; it applies conditioning and CFG itself.
        noise: (B, ...) the initial latents at ``sigmas[0]``.
        sigmas: (T + 1,) decreasing noise levels ending at 0.
        method: a name of :data:`SAMPLERS`: ``sde`` (Flow-GRPO), ``cps``, ``ode`` (Euler) or ``dpm2``.
        noise_level: noise scale of the stochastic steps (0 gives the deterministic solver everywhere).
        stochastic: (T,) bool, the SDE window; default every step for a stochastic method, none otherwise.
        generator: draws the step noise, on its own device (a CPU generator gives the same noise on every device); a
            list holds one generator per sample.
        record: keep every latent (Flow-GRPO training needs them); else only the first and last.
        deterministic: the solver of the steps outside the window, ``ode`` (Euler) or ``dpm2`` (MixGRPO-Flash's
            higher-order ODE); a deterministic ``method`` is its own solver. DPM-Solver++(2M) restarts at first order
            after each stochastic step (the noise breaks its multistep history).
        log_prob: the log-prob form of the stochastic steps (default: the method's, :data:`SAMPLERS`).
        record_means: also keep the mean of every stochastic step (GRPO-Guard's RatioNorm needs it).

    Returns:
        A :class:`Trajectory`. Log-probs are computed with ``firm.kernels.step_log_prob`` in float32.
    """
    spec = sampler_method(method)
    solver = method if not spec.stochastic else deterministic
    if sampler_method(solver).stochastic:
        raise ValueError(f"the solver outside the SDE window must be one of {DETERMINISTIC_SOLVERS}, got {solver!r}")
    form = log_prob or spec.log_prob
    sigmas = sigmas.detach().to("cpu", torch.float32)
    t = sigmas.numel() - 1
    if t < 1 or not bool((sigmas[1:] < sigmas[:-1]).all()) or float(sigmas[-1]) != 0.0:
        raise ValueError(f"sigmas must decrease strictly to 0, got {sigmas.tolist()}")
    if stochastic is None:
        stochastic = torch.full((t,), spec.stochastic, dtype=torch.bool)
    stochastic = stochastic.to("cpu", torch.bool).clone()
    if not spec.stochastic or noise_level <= 0:
        stochastic[:] = False
    for i in range(t):  # a step whose std is 0 (CPS's last one, to sigma 0) is deterministic and has no log-prob
        if bool(stochastic[i]):
            _, _, std = spec.coefs(sigmas[i : i + 1], sigmas[i + 1 : i + 2], noise_level, float(sigmas[1]))
            stochastic[i] = bool(std[0] > 0)
    sigma_cap = float(sigmas[1]) if t >= 1 else 1.0
    b = noise.shape[0]
    x = noise
    latents = [x]
    log_probs = torch.zeros(b, t, dtype=torch.float32, device=noise.device)
    means = torch.zeros(b, t, *noise.shape[1:], dtype=noise.dtype, device=noise.device) if record_means else None
    state = DPMState()
    for i in range(t):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        sig = _as_batch(s, x)
        v = velocity_fn(x, sig)
        if bool(stochastic[i]):
            coefs = step_coefs(method, sig, _as_batch(s_next, x), noise_level, sigma_cap)
            if isinstance(generator, (list, tuple)):  # one stream per sample (row)
                eps = torch.stack(
                    [torch.randn(x.shape[1:], generator=g, dtype=torch.float32, device=g.device) for g in generator]
                ).to(x.device, x.dtype)
            else:
                dev = generator.device if generator is not None else x.device  # a device generator: no host copy
                eps = torch.randn(x.shape, generator=generator, dtype=torch.float32, device=dev).to(x.device, x.dtype)
            x_next = apply_step(x, v, coefs, eps)
            log_probs[:, i], _ = step_log_prob(form, x, v, x_next, coefs)
            if means is not None:
                means[:, i] = apply_step(x, v, coefs)
            x = x_next
            state = DPMState()
        elif sampler_method(solver).multistep:
            x, state = dpm2_step(x, v, s, s_next, state)
        else:
            x = apply_step(x, v, ode_coefs(sig, _as_batch(s_next, x)))
        if record or i == t - 1:
            latents.append(x)
    return Trajectory(torch.stack(latents, dim=1), log_probs, sigmas, stochastic, sigma_cap, means)  # (B, T+1, ...)
