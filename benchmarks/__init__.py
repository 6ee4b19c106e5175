"""Benchmark and profiling programs over qasr_jax, each run as ``python -m benchmarks.NAME`` from the repository
root (``python -m benchmarks`` lists them). What they share is in ``benchmarks.common``; measured figures, with
their commands, machines and load averages, are in ``benchmarks/README.md``."""
