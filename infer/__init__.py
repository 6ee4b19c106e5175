"""Programs over qasr_jax: ``python -m infer transcribe``, ``python -m infer align``, ``python -m infer.bench``."""
