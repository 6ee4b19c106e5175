"""The work counts of the roofline model (``benchmarks.common``) against the model's own parameters and a count by hand."""

from __future__ import annotations

import numpy as np

from benchmarks import common
from qasr_jax.config import config_from_dict
from qasr_jax.weights import abstract_params, flatten_params
from tests.support import official


def test_decoder_matmul_params_are_the_decoder_layers_kernels() -> None:
    for name in ("asr-0.6b", "asr-1.7b"):
        config = config_from_dict(official.real_config(name))
        kernels = sum(
            int(np.prod(leaf.shape))
            for path, leaf in flatten_params(abstract_params(config))
            if path[:2] == ("decoder", "layers") and path[-1] == "kernel"
        )
        assert common.decoder_matmul_params(config) == kernels, name


def test_encoder_gflop_by_hand_at_the_released_config() -> None:
    """Counted by hand for ASR-0.6B, one 30 s clip (30 chunks of 100 frames; 390 tokens): per chunk conv1
    64×50 positions × 480 × 9 × 2, conv2 32×25 × 480² × 9 × 2, conv3 16×13 × 480² × 9 × 2, conv_out
    13 × 7680 × 896 × 2; 18 layers × 390 tokens × 2 × (4 × 896² + 2 × 896 × 3584); projections
    390 × 2 × (896² + 896 × 1024)."""
    config = config_from_dict(official.real_config("asr-0.6b"))
    per_chunk = 64 * 50 * 480 * 9 * 2 + 32 * 25 * 480**2 * 9 * 2 + 16 * 13 * 480**2 * 9 * 2 + 13 * 7680 * 896 * 2
    layers = 18 * 390 * 2 * (4 * 896**2 + 2 * 896 * 3584)
    projections = 390 * 2 * (896**2 + 896 * 1024)
    expected = (30 * per_chunk + layers + projections) / 1e9
    assert abs(common.encoder_gflop(config, 30.0) - expected) < 1e-6
