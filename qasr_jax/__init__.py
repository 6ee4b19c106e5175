"""qasr-jax: Qwen3-ASR and Qwen3-ForcedAligner in JAX/Flax."""

from qasr_jax import errors
from qasr_jax.config import AudioEncoderConfig, TextConfig, ThinkerConfig, load_config
from qasr_jax.weights import load_pretrained

__all__ = [
    "AudioEncoderConfig",
    "TextConfig",
    "ThinkerConfig",
    "errors",
    "load_config",
    "load_pretrained",
]
