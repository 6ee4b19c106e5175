"""qasr-jax: Qwen3-ASR and Qwen3-ForcedAligner in JAX/Flax."""

from qasr_jax import errors
from qasr_jax.aligner import ForcedAlignItem, ForcedAlignResult, Qwen3ForcedAligner
from qasr_jax.asr import ASRTranscription, Qwen3ASRModel
from qasr_jax.config import AudioEncoderConfig, TextConfig, ThinkerConfig, load_config
from qasr_jax.weights import load_pretrained

__all__ = [
    "ASRTranscription",
    "AudioEncoderConfig",
    "ForcedAlignItem",
    "ForcedAlignResult",
    "Qwen3ASRModel",
    "Qwen3ForcedAligner",
    "TextConfig",
    "ThinkerConfig",
    "errors",
    "load_config",
    "load_pretrained",
]
