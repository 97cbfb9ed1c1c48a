"""Policy evaluation: prompt sets, generate -> score -> report, judges per benchmark (`firm eval`, docs/eval.md).

The stages share one evaluator: :func:`firm.eval.generate.sample_images` (deterministic sampling from per-item,
per-seed noise) and the judges of :mod:`firm.eval.judges`. The shapes world's held-out evaluation (the demo's report)
calls the same two functions in memory; `firm eval` adds the manifest, the judge cache and the report around them.
"""
