"""The decode step with several LoRA adapters in one batch, against the base model, on the same state.

    python -m benchmarks.adapters [--model DIR] [--size demo|0.6b] [--rank 16] [--slots 8] [--steps 64]

A state of ``--slots`` rows (8) is filled by one prefill of 2-second clips, then ``generate`` runs ``--steps``
decode steps at a time (no row stops: end tokens are off) in three settings: the base model (no adapters passed),
the adapter program with every row on the base (slot 0: the cost of the gathered updates alone), and 4 different
adapters over the 8 rows (rank ``--rank`` on the decoder's q/k/v/o and MLP). Printed: milliseconds per decode
step (median of ``--repeats``), the ratio to the base, and the 1-minute load average beside each figure: the
machine may be shared, so compare figures of one run only.

The weights are random (``--model``'s config.json, or the demo model's, ``train/configs/demo_asr_init``;
``--size 0.6b`` widens it to the released 0.6B decoder and encoder): step cost does not depend on their values.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import numpy as np

from benchmarks import common

DEMO_CONFIG_DIR = os.path.join(common.REPO, "train", "configs", "demo_asr_init")
RELEASED_06B = {
    "audio_config": {"d_model": 896, "encoder_layers": 18, "encoder_attention_heads": 14, "encoder_ffn_dim": 3584,
                     "output_dim": 1024, "downsample_hidden_size": 480},
    "text_config": {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
                    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936},
}  # fmt: skip


def load_bench_config(model_dir: str | None, size: str):
    from qasr_jax.config import config_from_dict

    with open(os.path.join(model_dir or DEMO_CONFIG_DIR, "config.json"), encoding="utf-8") as f:
        raw = json.load(f)
    if size == "0.6b":
        thinker = raw["thinker_config"]
        for part, values in RELEASED_06B.items():
            thinker[part].update(values)
        thinker["text_config"]["rope_scaling"] = {"rope_type": "default", "mrope_section": [24, 20, 20],
                                                  "interleaved": True, "mrope_interleaved": True}  # fmt: skip
        thinker["audio_token_id"] = 151676
    return config_from_dict(raw)


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser("benchmarks.adapters", __doc__)
    parser.add_argument("--model", metavar="DIR", help="a checkpoint dir whose config.json sizes the model")
    parser.add_argument("--size", choices=("demo", "0.6b"), default="demo")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    import jax

    from qasr_jax import adapters as lora
    from qasr_jax import audio as audio_io
    from qasr_jax.engine import DecodeOptions, DecodeRequest, Engine
    from qasr_jax.model import Qwen3ASR

    config = load_bench_config(args.model, args.size)
    params = common.random_params(Qwen3ASR(config))
    spec = lora.LoraSpec(targets=lora.DECODER_TARGETS, rank=args.rank, alpha=2.0 * args.rank)
    loaded = []
    for i in range(args.adapters):
        tree = lora.init_adapters(config, spec, jax.random.key(i + 1))
        tree = jax.tree_util.tree_map(lambda x, i=i: x + 0.01 * jax.random.normal(jax.random.key(50 + i), x.shape),
                                      tree)  # fmt: skip
        loaded.append(lora.Adapter(f"adapter{i + 1}", tree, args.rank))
    stack = lora.stack_adapters(config, loaded)

    rng = np.random.default_rng(0)
    seconds = 2.0
    wav = (0.05 * rng.standard_normal(int(seconds * audio_io.SAMPLE_RATE))).astype(np.float32)
    audio_tokens = config.audio.output_length(audio_io.num_frames(len(wav)))
    prompt = [1, 2, *([config.audio_token_id] * audio_tokens), 3, 4]
    budget = args.steps * (args.repeats + 2) + 2
    engine = Engine(config, attention_impl="xla", options=DecodeOptions(eos_token_ids=()))

    def filled_state(slots: list[int], with_stack: bool):
        requests = [DecodeRequest(wav, prompt, budget, adapter=slot) for slot in slots]
        shape = engine.prefill_shape(requests, len(requests))
        state = engine.init_state(len(slots), shape.prompt_len + budget + 1, budget, start=shape.prompt_len)
        prefilled = engine.prefill(params, requests, shape, stack if with_stack else None)
        return engine.insert(state, prefilled, list(range(len(slots))))

    n = args.slots
    settings = [
        ("base model (no adapters)", [0] * n, False),
        ("adapter program, every row on the base", [0] * n, True),
        (
            f"{args.adapters} different adapters over {n} rows",
            [1 + i % args.adapters for i in range(n)],
            True,
        ),
    ]
    print(f"config: text hidden {config.text.hidden_size} × {config.text.num_hidden_layers} layers, "
          f"vocab {config.text.vocab_size}; rank {args.rank}; {n} rows; {args.steps} steps per call; "
          f"backend {jax.default_backend()}")  # fmt: skip
    print("note: the machine may be loaded by other work; the load average stands beside each figure")
    base_ms = None
    for label, slots, with_stack in settings:
        state = filled_state(slots, with_stack)
        adapters = stack if with_stack else None
        state = engine.generate(params, state, args.steps, adapters)  # compile and warm
        jax.block_until_ready(state.tokens)
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            state = engine.generate(params, state, args.steps, adapters)
            jax.block_until_ready(state.tokens)
            times.append((time.perf_counter() - started) / args.steps * 1e3)
        ms = statistics.median(times)
        base_ms = base_ms or ms
        print(f"{label:42s} {ms:8.3f} ms/step   ×{ms / base_ms:5.2f}   (load {os.getloadavg()[0]:.2f}, "
              f"spread {min(times):.3f}–{max(times):.3f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
