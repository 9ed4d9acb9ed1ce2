"""Benchmarks for scale_kernels: layer- and model-level timings against hand-written baselines.

Run a script with ``python -m benchmarks.<name>`` from the repository root (``bench_layer``, ``bench_model``,
``plot``, ``run_all``); every script takes ``--smoke`` for a tiny CPU run. See ``docs/benchmarks.md``.
"""
