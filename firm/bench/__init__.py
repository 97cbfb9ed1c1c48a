"""FIRM-Bench: evaluate critics against reference scores (MAE, correlations, parse failures) and report.

Modules: :mod:`firm.bench.data` (the local benchmark layout), :mod:`firm.bench.evaluate` (cached, resumable,
concurrent critic runs), :mod:`firm.bench.metrics`, :mod:`firm.bench.report`, :mod:`firm.bench.run`
(`firm critic bench`), :mod:`firm.bench.convert` (released FIRM-Bench files -> local layout,
`firm critic bench-convert`). The shapes world's synthetic benchmark is the plugin's (:mod:`firm.synthetic.bench`,
`firm shapes export-bench`): nothing here imports it. Nothing heavy is imported here, so that the CLI stays fast.
"""
