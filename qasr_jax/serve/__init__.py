"""An OpenAI-compatible transcription server with continuous batching (``python -m infer serve``).

``qasr_jax.serve.scheduler`` is the batching loop (no web dependencies); ``qasr_jax.serve.app`` the HTTP API,
which needs the ``serve`` extra (``pip install 'qasr-jax[serve]'``; without it: ``MissingExtraError``).
"""
