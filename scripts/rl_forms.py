"""How far FIRM's old KL and CPS log-prob forms were from Flow-GRPO's, per step of a schedule (docs/rl.md).

    python scripts/rl_forms.py [--steps 10] [--shift 3.0] [--noise-level 0.7]

Prints, for each sampling step of diffusers' FlowMatchEulerDiscreteScheduler: sigma, |dt|, the ratio of the
step-variance KL (``kl_form: step_variance``, FIRM's old default) to Flow-GRPO's KL on ``sde`` steps (= 1 / |dt|),
the CPS step std, and the factor 1 / (2 std^2) between the Gaussian and the constant-free CPS log-ratios.
"""

from __future__ import annotations

import argparse

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from firm.policies.samplers import cps_coefs, kl_std, sde_coefs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--noise-level", type=float, default=0.7)
    a = p.parse_args()
    sched = FlowMatchEulerDiscreteScheduler(shift=a.shift)
    sched.set_timesteps(a.steps)
    s = sched.sigmas.float()
    print(f"schedule: {a.steps} steps, shift {a.shift}, noise level {a.noise_level}")
    print("| step | sigma | |dt| | step-variance KL / Flow-GRPO KL (sde) | CPS std | Gaussian / residual log-ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for i in range(a.steps):
        sig, nxt = s[i : i + 1], s[i + 1 : i + 2]
        std = sde_coefs(sig, nxt, a.noise_level, float(s[1]))[2]
        kl_ratio = float((kl_std("sde", sig, nxt, std) / std) ** 2)
        cps_std = float(cps_coefs(sig, nxt, a.noise_level)[2])
        cps = f"{1 / (2 * cps_std**2):.3g}" if cps_std > 0 else "(deterministic)"
        print(f"| {i} | {float(sig):.4f} | {float(sig - nxt):.4f} | {kl_ratio:.1f} | {cps_std:.4g} | {cps} |")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
