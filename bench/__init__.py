"""Benchmark machinery for scripts/bench.py (issue 5): contenders, measurement, reports.

Kept out of the `krypton` package on purpose: the engine must not depend on Captum, matplotlib or
scikit-image, and the benchmark must only use krypton's public API.
"""
