"""Attention kernels: XLA references against naive numpy, Pallas kernels (interpret mode) against the references,
dispatch, and lowering of both kernel variants for TPU (Mosaic) and GPU (Triton)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.common import clip_window_lengths
from benchmarks.kernels import WINDOW
from benchmarks.kernels import main as bench_main
from qasr_jax.kernels import (
    causal_attention,
    causal_attention_xla,
    decode_attention_pallas,
    masked_softmax,
    resolve_impl,
    resolve_interpret,
    resolve_target,
    windowed_attention,
    windowed_attention_pallas,
    windowed_attention_xla,
)
from qasr_jax.kernels.decode_attention import decode_kernel_fits
from qasr_jax.kernels.windowed_attention import window_block_sizes

# Relative error bounds of the issue: max |kernel - reference| / max |reference|.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def random_array(rng: np.random.Generator, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32)).astype(dtype)


def relative_error(actual: jax.Array, expected: jax.Array) -> float:
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    expected = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
    scale = max(np.abs(expected).max(), 1e-30)
    return float(np.abs(actual - expected).max() / scale)


def kernel_mode(target: str | None = None) -> dict[str, object]:
    """How a kernel test runs its kernel: interpreted on the CPU (either target's variant, default TPU's);
    on an accelerator (``pytest -m accelerator`` there) its own variant compiled, and the other target's variant
    interpreted as on the CPU (a Mosaic TPU kernel cannot compile for a GPU, nor a Triton one for a TPU)."""
    if jax.default_backend() == "cpu":
        return {"interpret": True, "target": target or "tpu"}
    if target is not None and target != resolve_target(None):
        return {"interpret": True, "target": target}
    return {"interpret": False, "target": resolve_target(None)}


def naive_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """Softmax attention of q ``[queries, dim]`` over k, v ``[keys, dim]`` in float64; no keys gives zeros."""
    if k.shape[0] == 0:
        return np.zeros((q.shape[0], v.shape[1]))
    logits = q.astype(np.float64) @ k.astype(np.float64).T * scale
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    return weights @ v.astype(np.float64)


# --- XLA references against an independent numpy truth --------------------------------------------------------


@pytest.mark.parametrize(
    ("window", "heads", "head_dim", "valid_len"),
    [(13, 1, 64, [13, 1, 0, 6]), (104, 3, 64, [104, 57, 1]), (37, 2, 128, [0, 37, 20])],
)
def test_windowed_reference_matches_naive_softmax_per_window(window, heads, head_dim, valid_len):
    rng = np.random.default_rng(window)
    shape = (len(valid_len), window, heads, head_dim)
    q, k, v = (np.asarray(random_array(rng, shape)) for _ in range(3))
    lengths = jnp.asarray(valid_len, jnp.int32)
    out = np.asarray(windowed_attention_xla(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), lengths))

    expected = np.zeros(shape)
    for n, length in enumerate(valid_len):
        for h in range(heads):
            expected[n, :length, h] = naive_attention(
                q[n, :length, h], k[n, :length, h], v[n, :length, h], head_dim**-0.5
            )
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    for n, length in enumerate(valid_len):
        assert np.all(out[n, length:] == 0.0), "rows past valid_len must be exactly zero"


def test_windowed_reference_ignores_padding_content_and_windows_are_independent():
    rng = np.random.default_rng(1)
    shape = (3, 26, 2, 64)
    q, k, v = (random_array(rng, shape) for _ in range(3))
    lengths = jnp.asarray([26, 9, 0], jnp.int32)
    reference = jax.jit(windowed_attention_xla)
    out = reference(q, k, v, lengths)
    padding = np.arange(26)[None, :, None, None] >= np.asarray(lengths)[:, None, None, None]
    garbage = 1e3 * random_array(rng, shape)
    out_garbage = reference(
        jnp.where(padding, garbage, q),
        jnp.where(padding, garbage, k),
        jnp.where(padding, garbage, v),
        lengths,
    )
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out_garbage))
    # Window 0 alone gives the same rows: nothing leaks across windows.
    alone = reference(q[:1], k[:1], v[:1], lengths[:1])
    np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(out[0]), rtol=1e-6, atol=1e-7)


def test_windowed_reference_custom_scale():
    rng = np.random.default_rng(2)
    q, k, v = (random_array(rng, (1, 13, 1, 64)) for _ in range(3))
    out = windowed_attention_xla(q, k, v, jnp.asarray([13], jnp.int32), scale=0.3)
    expected = naive_attention(np.asarray(q[0, :, 0]), np.asarray(k[0, :, 0]), np.asarray(v[0, :, 0]), 0.3)
    np.testing.assert_allclose(np.asarray(out[0, :, 0]), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "q_len", "kv_len", "q_offset", "kv_start"),
    [
        (4, 4, 1, 20, 11, [0, 5, 11, 12]),  # MHA decode; last row sees nothing yet
        (8, 4, 3, 16, 7, [0, 2, 9, 10]),  # GQA 2; row 2 starts mid-chunk, row 3 after it
        (8, 2, 5, 12, 0, [0, 0, 1, 3]),  # GQA 4 prefill from slot 0
    ],
)
def test_causal_reference_matches_naive_softmax_with_left_padding_and_repeat_kv(
    q_heads, kv_heads, q_len, kv_len, q_offset, kv_start
):
    rng = np.random.default_rng(q_heads * 100 + q_len)
    batch, head_dim = len(kv_start), 64
    q = np.asarray(random_array(rng, (batch, q_len, q_heads, head_dim)))
    k = np.asarray(random_array(rng, (batch, kv_len, kv_heads, head_dim)))
    v = np.asarray(random_array(rng, (batch, kv_len, kv_heads, head_dim)))
    # The cache layout is head-major: [batch, kv_heads, kv_len, head_dim].
    out = np.asarray(
        causal_attention_xla(
            jnp.asarray(q),
            jnp.asarray(k.transpose(0, 2, 1, 3)),
            jnp.asarray(v.transpose(0, 2, 1, 3)),
            q_offset,
            jnp.asarray(kv_start, jnp.int32),
        )
    )
    # HF repeat_kv: each kv head repeated q_heads // kv_heads times, consecutively.
    k_rep = np.repeat(k, q_heads // kv_heads, axis=2)
    v_rep = np.repeat(v, q_heads // kv_heads, axis=2)
    expected = np.zeros(out.shape)
    for b in range(batch):
        for i in range(q_len):
            slots = slice(kv_start[b], q_offset + i + 1)
            for h in range(q_heads):
                expected[b, i, h] = naive_attention(
                    q[b, i : i + 1, h], k_rep[b, slots, h], v_rep[b, slots, h], head_dim**-0.5
                )[0]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_masked_softmax_empty_rows_are_zero_with_finite_gradients():
    logits = jnp.asarray([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = jnp.asarray([[True, False, True], [False, False, False]])
    probs = masked_softmax(logits, mask)
    np.testing.assert_allclose(
        np.asarray(probs[0]), [1 / (1 + np.e**2), 0.0, np.e**2 / (1 + np.e**2)], rtol=1e-6
    )
    np.testing.assert_array_equal(np.asarray(probs[1]), 0.0)
    grad = jax.grad(lambda x: jnp.sum(masked_softmax(x, mask) * jnp.arange(3.0)))(logits)
    assert np.all(np.isfinite(np.asarray(grad)))
    np.testing.assert_array_equal(np.asarray(grad[1]), 0.0)


# --- Pallas windowed attention (interpret mode) against the XLA reference ------------------------------------

WINDOW_CASES = {
    # id: (window, heads, head_dim, valid lengths); lengths include 0 (all padding) and 1.
    "w13_h1_d64": (13, 1, 64, [13, 1, 0, 7]),
    "w104_h14_d64": (104, 14, 64, [104, 57, 1]),
    "w37_h16_d128": (37, 16, 128, [0, 37, 20]),
    "w64_h4_d128": (64, 4, 128, [64, 33]),
    # Longer than one block on both targets: online softmax across key blocks, ragged query blocks.
    "w200_h2_d64": (200, 2, 64, [200, 130, 65]),
}


def windowed_inputs(case: str, dtype) -> tuple[jax.Array, ...]:
    window, heads, head_dim, lengths = WINDOW_CASES[case]
    rng = np.random.default_rng(sum(map(ord, case)))
    shape = (len(lengths), window, heads, head_dim)
    q, k, v = (random_array(rng, shape, dtype) for _ in range(3))
    return q, k, v, jnp.asarray(lengths, jnp.int32)


@pytest.mark.accelerator
@pytest.mark.parametrize(
    ("case", "dtype", "target"),
    [
        ("w13_h1_d64", jnp.float32, "tpu"),
        ("w104_h14_d64", jnp.float32, "gpu"),
        ("w37_h16_d128", jnp.float32, "tpu"),
        ("w64_h4_d128", jnp.float32, "gpu"),
        ("w200_h2_d64", jnp.float32, "tpu"),
        ("w200_h2_d64", jnp.float32, "gpu"),
        ("w104_h14_d64", jnp.bfloat16, "tpu"),
        ("w13_h1_d64", jnp.bfloat16, "gpu"),
    ],
)
def test_windowed_kernel_matches_reference(case, dtype, target):
    q, k, v, lengths = windowed_inputs(case, dtype)
    expected = jax.jit(windowed_attention_xla)(q, k, v, lengths)
    kernel = jax.jit(functools.partial(windowed_attention_pallas, **kernel_mode(target)))
    out = kernel(q, k, v, lengths)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    assert relative_error(out, expected) < TOLERANCE[dtype]
    for n, length in enumerate(np.asarray(lengths)):
        assert np.all(np.asarray(out[n, length:], np.float32) == 0.0)


@pytest.mark.accelerator
@pytest.mark.parametrize(
    ("case", "dtype", "target"),
    [("w104_h14_d64", jnp.float32, "tpu"), ("w37_h16_d128", jnp.bfloat16, "gpu")],
)
def test_windowed_kernel_gradients_match_reference(case, dtype, target):
    q, k, v, lengths = windowed_inputs(case, dtype)
    cotangent = random_array(np.random.default_rng(7), q.shape, dtype)

    def loss(attention, q, k, v, lengths, cotangent):
        return jnp.sum(attention(q, k, v, lengths).astype(jnp.float32) * cotangent.astype(jnp.float32))

    def loss_and_grads(attention):
        return jax.jit(jax.value_and_grad(functools.partial(loss, attention), argnums=(0, 1, 2)))(
            q, k, v, lengths, cotangent
        )

    expected_loss, expected = loss_and_grads(windowed_attention_xla)
    kernel_loss, grads = loss_and_grads(
        functools.partial(windowed_attention_pallas, **kernel_mode(target))
    )
    assert abs(float(kernel_loss - expected_loss)) < TOLERANCE[dtype] * float(jnp.sum(jnp.abs(cotangent)))
    for name, grad, reference in zip("qkv", grads, expected):
        assert grad.dtype == dtype, name
        assert relative_error(grad, reference) < TOLERANCE[dtype], name


def test_window_block_sizes_fit_each_target():
    assert window_block_sizes(104, "tpu") == (128, 128)
    assert window_block_sizes(13, "tpu") == (128, 128)
    assert window_block_sizes(200, "tpu") == (256, 128)
    assert window_block_sizes(13, "gpu") == (16, 16)
    assert window_block_sizes(104, "gpu") == (128, 128)
    assert window_block_sizes(200, "gpu") == (256, 64)


# --- Pallas decode attention (interpret mode) against the XLA reference --------------------------------------

DECODE_CASES = [
    # (q_heads, kv_heads, kv_len, head_dim, q_offset, kv_start per row, dtype, target)
    (4, 4, 48, 64, 40, [0, 17, 33, 41], jnp.float32, "gpu"),
    (8, 4, 256, 128, 200, [0, 130, 199, 201], jnp.float32, "tpu"),
    (8, 4, 256, 128, 255, [0, 1, 128, 255], jnp.bfloat16, "gpu"),
    (16, 4, 2048, 128, 1500, [0, 700, 1024, 1499], jnp.float32, "tpu"),
    (8, 2, 512, 128, 300, [0, 44, 256, 301], jnp.float32, "gpu"),
    (4, 1, 64, 64, 5, [0, 2, 5, 6], jnp.bfloat16, "tpu"),
]


@pytest.mark.accelerator
@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "kv_len", "head_dim", "q_offset", "kv_start", "dtype", "target"), DECODE_CASES
)
def test_decode_kernel_matches_reference(
    q_heads, kv_heads, kv_len, head_dim, q_offset, kv_start, dtype, target
):
    rng = np.random.default_rng(kv_len + q_heads)
    batch = len(kv_start)
    q = random_array(rng, (batch, 1, q_heads, head_dim), dtype)
    k = random_array(rng, (batch, kv_heads, kv_len, head_dim), dtype)
    v = random_array(rng, (batch, kv_heads, kv_len, head_dim), dtype)
    starts = jnp.asarray(kv_start, jnp.int32)
    assert decode_kernel_fits(q.shape, k.shape, target)
    expected = jax.jit(causal_attention_xla)(q, k, v, q_offset, starts)
    kernel = jax.jit(functools.partial(decode_attention_pallas, **kernel_mode(target)))
    out = kernel(q, k, v, jnp.int32(q_offset), starts)
    assert out.shape == q.shape and out.dtype == dtype
    assert relative_error(out, expected) < TOLERANCE[dtype]
    for b, start in enumerate(kv_start):
        if start > q_offset:
            assert np.all(np.asarray(out[b], np.float32) == 0.0), "a row with nothing visible must be zero"


@pytest.mark.accelerator
def test_decode_kernel_ignores_cache_past_the_current_slot():
    rng = np.random.default_rng(3)
    q = random_array(rng, (2, 1, 8, 128))
    k, v = (random_array(rng, (2, 4, 256, 128)) for _ in range(2))
    starts = jnp.asarray([0, 20], jnp.int32)
    kernel = jax.jit(functools.partial(decode_attention_pallas, **kernel_mode()))
    out = kernel(q, k, v, jnp.int32(100), starts)
    future = jnp.arange(256)[None, None, :, None] > 100
    out_garbage = kernel(q, jnp.where(future, 1e3, k), jnp.where(future, 1e3, v), jnp.int32(100), starts)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out_garbage))


def test_decode_kernel_fits_only_shapes_it_can_tile():
    assert decode_kernel_fits((2, 1, 16, 128), (2, 8, 4096, 128), "tpu")
    assert decode_kernel_fits((2, 1, 16, 128), (2, 8, 4096, 128), "gpu")
    assert not decode_kernel_fits((2, 3, 16, 128), (2, 8, 4096, 128), "tpu")  # prefill
    assert not decode_kernel_fits((2, 1, 16, 128), (2, 8, 100, 128), "gpu")  # cache not a multiple of 16
    assert decode_kernel_fits((2, 1, 16, 64), (2, 8, 256, 64), "tpu")  # a tile spans the whole head
    assert decode_kernel_fits((2, 1, 16, 64), (2, 8, 256, 64), "gpu")
    assert not decode_kernel_fits((2, 1, 16, 48), (2, 8, 256, 48), "gpu")  # not a power of two
    with pytest.raises(ValueError, match="decode kernel"):
        decode_attention_pallas(
            jnp.zeros((1, 1, 2, 64)),
            jnp.zeros((1, 1, 100, 64)),
            jnp.zeros((1, 1, 100, 64)),
            3,
            jnp.zeros(1, int),
        )


# --- Dispatch --------------------------------------------------------------------------------------------------


def uses_pallas(function, *args) -> bool:
    return "pallas_call" in str(jax.make_jaxpr(function)(*args))


def test_dispatch_on_cpu_defaults_to_xla_and_forced_pallas_interprets():
    assert jax.default_backend() == "cpu"
    assert resolve_impl("auto") == "xla"
    assert resolve_impl("pallas") == "pallas"
    assert resolve_interpret(None) is True
    assert resolve_interpret(False) is False
    with pytest.raises(ValueError, match="impl"):
        resolve_impl("triton")

    q, k, v, lengths = windowed_inputs("w13_h1_d64", jnp.float32)
    auto = functools.partial(windowed_attention, valid_len=lengths)
    forced = functools.partial(windowed_attention, valid_len=lengths, impl="pallas")
    assert not uses_pallas(auto, q, k, v)
    assert uses_pallas(forced, q, k, v)
    np.testing.assert_array_equal(
        np.asarray(auto(q, k, v)), np.asarray(windowed_attention_xla(q, k, v, lengths))
    )
    assert relative_error(forced(q, k, v), auto(q, k, v)) < 1e-5


def test_causal_dispatch_uses_the_kernel_only_for_decode_shapes_it_fits():
    rng = np.random.default_rng(4)
    starts = jnp.asarray([0, 3], jnp.int32)
    k, v = (random_array(rng, (2, 2, 32, 128)) for _ in range(2))
    decode_q = random_array(rng, (2, 1, 4, 128))
    prefill_q = random_array(rng, (2, 5, 4, 128))

    @functools.partial(jax.jit, static_argnames="impl")
    def run(q, k, v, impl):
        return causal_attention(q, k, v, jnp.int32(20), starts, impl=impl)

    assert uses_pallas(functools.partial(run, impl="pallas"), decode_q, k, v)
    assert not uses_pallas(functools.partial(run, impl="auto"), decode_q, k, v)
    assert not uses_pallas(functools.partial(run, impl="pallas"), prefill_q, k, v)
    odd_k, odd_v = k[:, :, :30], v[:, :, :30]
    assert not uses_pallas(functools.partial(run, impl="pallas"), decode_q, odd_k, odd_v)
    assert relative_error(run(decode_q, k, v, "pallas"), run(decode_q, k, v, "xla")) < 1e-5
    np.testing.assert_array_equal(
        np.asarray(run(prefill_q, k, v, "pallas")),
        np.asarray(causal_attention_xla(prefill_q, k, v, 20, starts)),
    )


def test_shape_errors_name_the_expected_layout():
    with pytest.raises(ValueError, match="num_windows, window, heads, head_dim"):
        windowed_attention(
            jnp.zeros((2, 13, 64)), jnp.zeros((2, 13, 64)), jnp.zeros((2, 13, 64)), jnp.zeros(2, int)
        )
    with pytest.raises(ValueError, match="kv_heads divide q_heads"):
        causal_attention(
            jnp.zeros((1, 1, 3, 64)), jnp.zeros((1, 2, 8, 64)), jnp.zeros((1, 2, 8, 64)), 0, jnp.zeros(1, int)
        )


# --- Lowering for real accelerators (no accelerator needed) --------------------------------------------------

# Exporting for a platform runs the Pallas lowering of that platform: Mosaic for TPU, Triton IR for CUDA. It
# catches block-shape, dtype and op-support errors without hardware (the final Mosaic/PTX compile still
# happens on the device). The Triton custom call has no serialisation guarantee; that check is irrelevant here.
_EXPORT_CHECKS = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]


@pytest.mark.parametrize(
    ("target", "export_platform", "custom_call"),
    [("tpu", "tpu", "tpu_custom_call"), ("gpu", "cuda", "__gpu$xla.gpu.triton")],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_lower_for_tpu_and_gpu(target, export_platform, custom_call, dtype):
    windows = jax.ShapeDtypeStruct((8, 104, 14, 64), dtype)
    lengths = jax.ShapeDtypeStruct((8,), jnp.int32)
    windowed = functools.partial(windowed_attention_pallas, target=target)

    def windowed_loss(q, k, v, lengths):
        return jnp.sum(windowed(q, k, v, lengths).astype(jnp.float32))

    exported = jax.export.export(
        jax.jit(jax.value_and_grad(windowed_loss, argnums=(0, 1, 2))),
        platforms=[export_platform],
        disabled_checks=_EXPORT_CHECKS,
    )(windows, windows, windows, lengths)
    assert f"@{custom_call}" in exported.mlir_module()

    query = jax.ShapeDtypeStruct((4, 1, 16, 128), dtype)
    cache = jax.ShapeDtypeStruct((4, 8, 4096, 128), dtype)
    decode = jax.jit(functools.partial(decode_attention_pallas, target=target))
    exported = jax.export.export(decode, platforms=[export_platform], disabled_checks=_EXPORT_CHECKS)(
        query, cache, cache, jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((4,), jnp.int32)
    )
    assert f"@{custom_call}" in exported.mlir_module()


# --- Benchmark program -----------------------------------------------------------------------------------------


def test_bench_lays_30_second_clips_into_ragged_windows_and_prints_a_table(capsys):
    np.testing.assert_array_equal(clip_window_lengths(2, 30, WINDOW), [104, 104, 104, 78] * 2)
    np.testing.assert_array_equal(clip_window_lengths(1, 8, WINDOW), [104])
    bench_main(["--clips", "1", "--repeats", "1", "--seconds", "9"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("device: cpu")
    rows = [line.split() for line in lines[2:]]
    assert [(row[0], row[1], row[2]) for row in rows] == [("1", "2", "xla"), ("1", "2", "pallas")]
    assert all(float(row[3]) > 0 for row in rows)
