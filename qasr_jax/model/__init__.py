"""Pure Flax (Linen) modules of the Qwen3-ASR thinker; no I/O."""

from qasr_jax.model.decoder import init_cache
from qasr_jax.model.encoder import AudioEncoder
from qasr_jax.model.thinker import (
    Qwen3ASR,
    extend_cache,
    first_valid,
    positions_from_mask,
    unrolled,
)

__all__ = [
    "AudioEncoder",
    "Qwen3ASR",
    "extend_cache",
    "first_valid",
    "init_cache",
    "positions_from_mask",
    "unrolled",
]
