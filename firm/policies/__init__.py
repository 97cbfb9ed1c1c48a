"""RL for flow-matching image models: the LoRA flow policy, samplers with log-probs, Flow-GRPO and DiffusionNFT.

- :mod:`firm.policies.policy` — :class:`~firm.policies.policy.FlowPolicy` over diffusers components (SD3 / SD3.5,
  Qwen-Image-Edit), LoRA adapters (trained, old, reference = disabled), cached prompt embeddings.
- :mod:`firm.policies.samplers` — SDE / CPS / Euler / DPM-Solver++(2M) steps and whole trajectories.
- the RL algorithms that train these policies live in :mod:`firm.algorithms`, with the critic scoring that overlaps
  sampling (:mod:`firm.algorithms.scoring`).
- :mod:`firm.policies.export` — ``firm policy export``: the trained LoRA for diffusers' ``load_lora_weights``.

See docs/rl.md. Submodules are imported on use, so ``import firm.policies`` stays light.
"""
