"""The user commands over qasr_jax: ``python -m infer transcribe``, ``align``, ``stream`` and ``serve``."""
