"""Profiling: where the time of an RL step goes (:mod:`firm.profile.step`, `firm profile step`).

The fused kernels have their own timing harness (:mod:`firm.kernels.bench`, `firm kernels time`). Nothing heavy is
imported here, so that the CLI stays fast.
"""
