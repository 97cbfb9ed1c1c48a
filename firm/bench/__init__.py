"""FIRM-Bench: evaluate critics against reference scores (MAE, correlations, parse failures) and report.

Modules: :mod:`firm.bench.data` (the local benchmark layout), :mod:`firm.bench.evaluate` (cached, resumable,
concurrent critic runs), :mod:`firm.bench.metrics`, :mod:`firm.bench.report`, :mod:`firm.bench.run` (`firm bench`),
:mod:`firm.bench.convert` (released FIRM-Bench files -> local layout), :mod:`firm.bench.synthetic` (shapes world).
Nothing heavy is imported here, so that the CLI stays fast.
"""
