"""Where a decode step's time goes: the whole step, the decoder layers alone, the head alone, and the step over a
short and a long cache, at each batch size; with the bytes each part must read and the bandwidth that implies.

    python -m benchmarks.profile_step [--checkpoint DIR] [--batch-sizes 1,8] [--cache-lens 128,512] [--repeats 20]

Without ``--checkpoint`` it uses (or builds) the random-weight ASR-0.6B checkpoint of ``benchmarks.transcribe``. Each
program is compiled first and timed as the median of ``--repeats`` runs, the caches donated as in the engine.
"""

from __future__ import annotations

import os

from benchmarks import common
from benchmarks.common import jax_median_ms


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser("benchmarks.profile_step", __doc__)
    parser.add_argument("--checkpoint", metavar="DIR")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--cache-lens", default="128,512")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from qasr_jax.model import Qwen3ASR
    from qasr_jax.model.decoder import Decoder, init_cache
    from qasr_jax.model.thinker import extend_cache, unrolled
    from qasr_jax.weights import load_pretrained

    path = args.checkpoint or common.random_checkpoint("asr-0.6b")
    config, params = load_pretrained(path, jnp.float32)
    model = Qwen3ASR(config)
    step_model, step_params = unrolled(model, params)
    cfg = config.text
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
    layer_bytes = nbytes(step_params["decoder"])
    head_bytes = cfg.vocab_size * cfg.hidden_size * 4
    print(f"load average at start: {os.getloadavg()[0]:.2f}; {jax.devices()[0].device_kind}, "
          f"{cfg.num_hidden_layers} layers, decoder weights {layer_bytes / 2**30:.2f} GiB, "
          f"head {head_bytes / 2**30:.2f} GiB (fp32)")  # fmt: skip

    def caches_for(batch: int, cache_len: int) -> list:
        return init_cache(cfg, batch, cache_len, jnp.float32)

    step = jax.jit(
        lambda p, t, pos, start, c, i: extend_cache(step_model, p, t[:, None], pos[:, None], start, c, i),
        donate_argnums=(4,),
    )

    def layers_only(decoder_params, x, pos, start, c, i):
        decoder = Decoder(cfg, step_model.attention_impl, scan_layers=False)
        return decoder.apply({"params": decoder_params}, x, pos, start, c, i)

    layers_jit = jax.jit(layers_only, donate_argnums=(4,))
    head = jax.jit(lambda p, h: model.apply({"params": p}, h, method=Qwen3ASR.head))

    def measure(batch: int, cache_len: int) -> tuple[float, float, float]:
        tokens = jnp.ones((batch,), jnp.int32)
        positions = jnp.full((batch,), cache_len // 2, jnp.int32)
        start = jnp.zeros((batch,), jnp.int32)
        index = jnp.int32(cache_len // 2)
        state = {"caches": caches_for(batch, cache_len)}
        x = jnp.ones((batch, 1, cfg.hidden_size), jnp.float32)
        pos3 = jnp.broadcast_to(positions[None, :, None], (3, batch, 1))

        def run_step():
            logits, state["caches"] = step(step_params, tokens, positions, start, state["caches"], index)
            return logits

        def run_layers():
            hidden, state["caches"] = layers_jit(step_params["decoder"], x, pos3, start, state["caches"], index)
            return hidden

        return (
            jax_median_ms(run_step, args.repeats),
            jax_median_ms(run_layers, args.repeats),
            jax_median_ms(lambda: head(params, x), args.repeats),
        )

    print(
        f"{'batch':>5s} {'cache':>6s} {'step ms':>8s} {'layers ms':>10s} {'head ms':>8s} {'step GB/s':>10s}"
    )
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        for cache_len in [int(c) for c in args.cache_lens.split(",")]:
            step_ms, layers_ms, head_ms = measure(batch, cache_len)
            cache_bytes = (
                2 * cfg.num_hidden_layers * batch * cache_len * cfg.num_key_value_heads * cfg.head_dim * 4
            )
            gbps = (layer_bytes + head_bytes + cache_bytes) / (step_ms / 1000) / 1e9
            print(f"{batch:5d} {cache_len:6d} {step_ms:8.1f} {layers_ms:10.1f} {head_ms:8.1f} {gbps:10.1f}"
                  f"   (load {os.getloadavg()[0]:.2f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
