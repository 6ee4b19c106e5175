"""One short run that measures what only an accelerator can: kernels compiled and timed, throughput, memory.

    python -m benchmarks.accelerator_suite --out DIR            # one GPU or TPU host, at most 8 minutes
    python -m benchmarks.accelerator_suite --out DIR --tiny     # the same sections on the CPU, tiny sizes

Writes ``DIR/report.json`` and ``DIR/report.md`` and prints the hardware it saw. Sections (each runs even when an
earlier one failed, a failure recorded with its traceback; none starts after ``--budget-s``, 7.5 minutes):

- ``kernel_tests``: ``pytest -m accelerator tests/test_kernels.py``: the Pallas kernels against their XLA
  references, compiled on a GPU/TPU (interpreted on the CPU);
- ``kernel_timing``: windowed attention (encoder) and decode attention (one decoder layer, one step), Pallas
  kernel vs XLA, at the real ASR-0.6B and ASR-1.7B head shapes: 64 clips of 30 s in 8 s windows, and a
  1024-slot cache at batch 1/32/128;
- ``encoder``: log-mel + encoder audio-seconds per second at batch 64 × 30 s;
- ``end_to_end``: ``Engine.run`` of 128 × 30 s clips with exactly 100 new tokens each (end tokens
  suppressed), audio-seconds per second, beside the paper's vLLM figure (about 2,000 at concurrency 128);
- ``aligner``: ``Qwen3ForcedAligner.align`` audio-seconds per second at batch 32 × 30 s, beside the paper's
  figure (about 1,000);
- ``decode``: one decode step (all 28 layers, the engine's generate loop) at batch 1/32/128 after a 30 s clip's
  prompt (420 cache slots).

Models are the released ASR-0.6B and ForcedAligner-0.6B configs with random weights (the model's own
initialisers) in bf16: speed does not depend on the values. Every section records its compile time apart from its
run time and the device's peak memory so far. ``--tiny`` swaps in the tiny test configs and batch sizes (kernel
shapes stay real, with one clip and a short cache), so CI runs every line of this program. Needs neither torch
nor a checkpoint; speech comes from espeak-ng where it is installed, else seeded noise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import platform as host_platform
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from benchmarks import common
from benchmarks.common import (
    EOS_TOKEN_IDS,
    SAMPLE_RATE,
    median_seconds,
    peak_rss_gb,
    random_params,
    speech_clip,
)

PAPER_ASR_AUDIO_S_PER_S = 2000.0  # Qwen3-ASR-0.6B on vLLM at concurrency 128 (RTF 0.064)
PAPER_ALIGNER_AUDIO_S_PER_S = 1000.0  # Qwen3-ForcedAligner-0.6B
# In the order they run: the compile-heaviest (three decode-state shapes) last, so a run that meets its time
# budget (``--budget-s``) loses the least.
SECTIONS = ("kernel_tests", "kernel_timing", "encoder", "end_to_end", "aligner", "decode")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What the suite runs at: the full accelerator sizes, or tiny ones for the CPU."""

    asr_model: str  # a released config ("asr-0.6b") or a tiny test one ("small-asr"): common.official_config
    aligner_model: str  # "aligner-0.6b" or "small-aligner"
    kernel_models: tuple[str, ...]  # released configs whose head shapes the kernels are timed at
    kernel_clips: int  # clips laid into encoder windows
    kernel_batches: tuple[int, ...]  # decode-attention batch sizes
    kernel_cache: int  # decode-attention cache slots
    kernel_repeats: int
    clip_seconds: float
    encoder_batch: int
    decode_batches: tuple[int, ...]
    decode_context: int  # cache slots filled before the timed steps (a 30 s clip's prompt is ~420 tokens)
    decode_steps: int
    e2e_batch: int
    e2e_tokens: int
    aligner_batch: int
    repeats: int
    kernel_test_filter: str | None  # pytest -k expression (None: every accelerator test)
    kernel_test_timeout_s: int


FULL = Sizes(
    asr_model="asr-0.6b", aligner_model="aligner-0.6b", kernel_models=("asr-0.6b", "asr-1.7b"), kernel_clips=64,
    kernel_batches=(1, 32, 128), kernel_cache=1024, kernel_repeats=20, clip_seconds=30.0, encoder_batch=64, decode_batches=(1, 32, 128), decode_context=420,
    decode_steps=64, e2e_batch=128, e2e_tokens=100, aligner_batch=32, repeats=3, kernel_test_filter=None,
    kernel_test_timeout_s=240,
)  # fmt: skip
TINY = Sizes(
    asr_model="small-asr", aligner_model="small-aligner", kernel_models=("asr-0.6b", "asr-1.7b"), kernel_clips=1,
    kernel_batches=(1,), kernel_cache=256, kernel_repeats=1, clip_seconds=3.0, encoder_batch=2, decode_batches=(1, 2, 4), decode_context=48,
    decode_steps=8, e2e_batch=4, e2e_tokens=8, aligner_batch=2, repeats=1,
    kernel_test_filter="(matches_reference and w13_h1_d64 and float32) or ignores_cache", kernel_test_timeout_s=120,
)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Shared pieces


@functools.lru_cache(maxsize=2)
def bf16_params(name: str, seed: int = 0) -> Any:
    """Random bf16 params of the model ``name`` (see ``common.official_config``), made once per run and shared by
    the sections (speed does not depend on the values)."""
    import jax.numpy as jnp

    from qasr_jax.model import Qwen3ASR

    model = Qwen3ASR(common.thinker_config(name), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    return random_params(model, seed)


# The chat-template prompt around the audio, as Qwen2 BPE ids: <|im_start|>system\n<|im_end|>\n<|im_start|>user\n
# <|audio_start|>…<|audio_end|><|im_end|>\n<|im_start|>assistant\n ("system" 8948, "user" 872, "assistant" 77091,
# "\n" 198). The ids only set the prompt's length here; no tokenizer is needed.
_PROMPT_HEAD = (151644, 8948, 198, 151645, 198, 151644, 872, 198, 151669)
_PROMPT_TAIL = (151670, 151645, 198, 151644, 77091, 198)


def prompt_ids(config: Any, samples: int) -> list[int]:
    """The ASR prompt of a clip of ``samples`` samples, its audio slot expanded to the encoder output length."""
    from qasr_jax import audio

    audio_tokens = config.audio.output_length(audio.num_frames(samples))
    return [*_PROMPT_HEAD, *([config.audio_token_id] * audio_tokens), *_PROMPT_TAIL]


def aligner_words(seconds: float) -> str:
    """About 2.5 words a second of English text."""
    words = common.speech.LONG_EN.split()
    count = max(1, round(2.5 * seconds))
    return " ".join((words * (count // len(words) + 1))[:count])


def peak_device_gb() -> float | None:
    """The default device's peak memory in use so far (None where the backend does not say, as on the CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def compiled(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """``fn`` jitted and compiled for ``args``, and the seconds that took."""
    import jax

    started = time.perf_counter()
    program = jax.jit(fn).lower(*args).compile()
    return program, time.perf_counter() - started


# ----------------------------------------------------------------------------------------------------------------
# Sections


def hardware() -> dict[str, Any]:
    import jax
    import jaxlib

    devices = jax.devices()
    stats = devices[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    return {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "devices": len(devices),
        "processes": jax.process_count(),
        "device_memory_gb": None if limit is None else limit / 2**30,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "host": host_platform.node(),
        "host_cpus": os.cpu_count(),
        "python": host_platform.python_version(),
    }


def kernel_tests(sizes: Sizes, out_dir: str) -> dict[str, Any]:
    """``pytest -m accelerator`` on the kernel tests in a subprocess; counts and failures from its JUnit XML.

    ``--noconftest``: the suite's conftest pins JAX to the CPU and requires the parity references (torch,
    qwen-asr, espeak-ng), none of which the kernel tests use.
    """
    import jax

    xml_path = os.path.join(out_dir, "kernel_tests.xml")
    command = [sys.executable, "-m", "pytest", "tests/test_kernels.py", "-m", "accelerator", "-q", "--noconftest",
               "-p", "no:cacheprovider", "-o", "addopts=", f"--junitxml={xml_path}"]  # fmt: skip
    if sizes.kernel_test_filter:
        command += ["-k", sizes.kernel_test_filter]
    env = {**os.environ, "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=common.REPO, env=env, capture_output=True, text=True,
                          timeout=sizes.kernel_test_timeout_s)  # fmt: skip
    seconds = time.perf_counter() - started
    with open(os.path.join(out_dir, "kernel_tests.log"), "w", encoding="utf-8") as log:
        log.write(done.stdout + done.stderr)
    suite = ET.parse(xml_path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in suite.iter("testcase"):
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            failed.append(f"{case.get('name')}: {problem.get('message', '')[:300]}")
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    if done.returncode not in (0, 1) or counts["tests"] == 0:
        raise RuntimeError(f"pytest exited {done.returncode}: {(done.stdout + done.stderr)[-2000:]}")
    return {
        "mode": "interpreted" if jax.default_backend() == "cpu" else "compiled",
        "passed": passed,
        **counts,
        "failed": failed,
        "seconds": seconds,
        "command": " ".join(command[1:]),
    }


def kernel_timing(sizes: Sizes) -> dict[str, Any]:
    """Pallas kernel vs XLA, forward, bf16, at the released models' head shapes."""
    import jax
    import jax.numpy as jnp

    from qasr_jax.kernels import (
        causal_attention_xla,
        decode_attention_pallas,
        decode_kernel_fits,
        resolve_interpret,
        resolve_target,
        windowed_attention_pallas,
        windowed_attention_xla,
    )
    from qasr_jax.model.decoder import layer_cache_shape

    interpret, target = resolve_interpret(None), resolve_target(None)
    windowed_kernel = functools.partial(windowed_attention_pallas, interpret=interpret, target=target)
    decode_kernel = functools.partial(decode_attention_pallas, interpret=interpret, target=target)
    dtype = jnp.bfloat16

    def milliseconds(fn: Callable[..., Any], *args: Any) -> float:
        return common.jax_median_ms(functools.partial(jax.jit(fn), *args), sizes.kernel_repeats)

    windowed, decode, seen = [], [], set()
    for name in sizes.kernel_models:
        config = common.thinker_config(name)
        audio_cfg, text_cfg = config.audio, config.text
        window = audio_cfg.window_chunks * audio_cfg.tokens_per_chunk
        lengths = jnp.asarray(common.clip_window_lengths(sizes.kernel_clips, int(sizes.clip_seconds), window))
        shape = (lengths.shape[0], window, audio_cfg.encoder_attention_heads, audio_cfg.head_dim)
        q, k, v = (jax.random.normal(key, shape, jnp.float32).astype(dtype)
                   for key in jax.random.split(jax.random.key(0), 3))  # fmt: skip
        row = {"model": name, "windows": shape[0], "window": window, "heads": shape[2], "head_dim": shape[3],
               "xla_ms": milliseconds(windowed_attention_xla, q, k, v, lengths),
               "pallas_ms": milliseconds(windowed_kernel, q, k, v, lengths)}  # fmt: skip
        row["speedup"] = row["xla_ms"] / row["pallas_ms"]
        windowed.append(row)

        heads = (text_cfg.num_attention_heads, text_cfg.num_key_value_heads, text_cfg.head_dim)
        if heads in seen:  # the 0.6B and 1.7B decoders share their attention shapes
            continue
        seen.add(heads)
        for batch in sizes.kernel_batches:
            rng = np.random.default_rng(batch)
            cache_shape = layer_cache_shape(text_cfg, batch, sizes.kernel_cache)
            args = (
                jnp.asarray(rng.standard_normal((batch, 1, heads[0], heads[2])), dtype),  # q
                jnp.asarray(rng.standard_normal(cache_shape), dtype),  # k
                jnp.asarray(rng.standard_normal(cache_shape), dtype),  # v
                jnp.int32(sizes.kernel_cache - 1),  # the slot of the new token
                jnp.asarray(rng.integers(0, sizes.kernel_cache // 4, batch), jnp.int32),  # kv_start
            )
            row = {"models": name, "batch": batch, "cache": sizes.kernel_cache, "q_heads": heads[0],
                   "kv_heads": heads[1], "head_dim": heads[2], "xla_ms": milliseconds(causal_attention_xla, *args),
                   "pallas_ms": None, "speedup": None}  # fmt: skip
            if decode_kernel_fits(args[0].shape, args[1].shape, target):
                row["pallas_ms"] = milliseconds(decode_kernel, *args)
                row["speedup"] = row["xla_ms"] / row["pallas_ms"]
            decode.append(row)
    return {
        "interpreted": interpret,
        "target": target,
        "dtype": "bfloat16",
        "windowed": windowed,
        "decode": decode,
    }


def encoder(sizes: Sizes) -> dict[str, Any]:
    """Log-mel + encoder (with projector) of ``encoder_batch`` clips in one program."""
    import jax
    import jax.numpy as jnp

    from qasr_jax import audio
    from qasr_jax.model import Qwen3ASR

    config = common.thinker_config(sizes.asr_model)
    model = Qwen3ASR(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = bf16_params(sizes.asr_model)
    clip = speech_clip(sizes.clip_seconds)
    window = config.audio.window_frames
    frames = -(-audio.num_frames(len(clip)) // window) * window  # whole windows, as the engine pads

    def encode(p: Any, waves: jax.Array, lengths: jax.Array) -> jax.Array:
        feats, valid = audio.log_mel(waves, lengths, frames=frames)
        mask = (jnp.arange(frames)[None, :] < valid[:, None]).astype(jnp.int32)
        return model.apply({"params": p}, feats, mask, method=Qwen3ASR.encode_audio)[0]

    n = sizes.encoder_batch
    waves = np.zeros((n, (frames + 1) * audio.HOP_LENGTH), np.float32)
    waves[:, : len(clip)] = clip
    waves = jnp.asarray(waves)
    lengths = jnp.full((n,), len(clip), jnp.int32)
    program, compile_s = compiled(encode, params, waves, lengths)
    jax.block_until_ready(program(params, waves, lengths))
    seconds = median_seconds(lambda: jax.block_until_ready(program(params, waves, lengths)), sizes.repeats)
    return {"model": sizes.asr_model, "batch": n, "clip_seconds": sizes.clip_seconds, "frames": frames,
            "seconds": seconds, "audio_s_per_s": n * sizes.clip_seconds / seconds, "compile_s": compile_s}  # fmt: skip


def decode(sizes: Sizes) -> dict[str, Any]:
    """The engine's generate loop over a state of live slots with ``decode_context`` cache slots already filled:
    seconds per step (all decoder layers, the head and the greedy choice) at each batch size."""
    import jax
    import jax.numpy as jnp

    from qasr_jax.engine import DecodeOptions, Engine

    config = common.thinker_config(sizes.asr_model)
    engine = Engine(config, dtype=jnp.bfloat16, options=DecodeOptions(suppress_token_ids=EOS_TOKEN_IDS))
    params = bf16_params(sizes.asr_model)
    rows = []
    for batch in sizes.decode_batches:
        steps = sizes.decode_steps
        cache_len = sizes.decode_context + steps

        def live_state(batch: int = batch, steps: int = steps, cache_len: int = cache_len) -> Any:
            """A ready state whose first ``batch`` slots are live (the engine may add idle slots)."""
            state = engine.init_state(batch, cache_len, steps, start=sizes.decode_context)
            live = jnp.arange(state.live.shape[0]) < batch
            state = state.replace(live=live, budgets=jnp.full_like(state.budgets, steps),
                                  kv_start=jnp.zeros_like(state.kv_start))  # fmt: skip
            return jax.block_until_ready(state)

        def seconds(steps: int, live_state: Callable[[], Any] = live_state) -> tuple[float, int]:
            state = live_state()
            started = time.perf_counter()
            counts = jax.device_get(engine.generate(params, state, steps).counts)
            return time.perf_counter() - started, int(counts.max())

        compile_before = engine.programs.seconds
        seconds(steps)  # compiles
        compile_s = engine.programs.seconds - compile_before
        # The fastest of the runs (others' load only slows a run down); one launch and one read-back per run.
        runs = [seconds(steps) for _ in range(max(1, sizes.repeats))]
        step = min(elapsed / done for elapsed, done in runs)
        done_steps = runs[0][1]
        rows.append({"batch": batch, "slots": int(live_state().live.shape[0]), "context": sizes.decode_context,
                     "steps": done_steps, "step_ms": 1e3 * step, "tokens_per_s": batch / step,
                     "compile_s": compile_s})  # fmt: skip
    return {"model": sizes.asr_model, "rows": rows}


def end_to_end(sizes: Sizes) -> dict[str, Any]:
    """``Engine.run`` of a full batch: log-mel, encoder, prefill, exactly ``e2e_tokens`` greedy steps."""
    import jax.numpy as jnp

    from qasr_jax.engine import DecodeOptions, DecodeRequest, Engine

    config = common.thinker_config(sizes.asr_model)
    params = bf16_params(sizes.asr_model)
    engine = Engine(config, dtype=jnp.bfloat16, options=DecodeOptions(suppress_token_ids=EOS_TOKEN_IDS))
    clip = speech_clip(sizes.clip_seconds)
    # Each row its own audio (shifted speech), so no two rows are the same.
    requests = [
        DecodeRequest(np.roll(clip, 1600 * i), prompt_ids(config, len(clip)), sizes.e2e_tokens)
        for i in range(sizes.e2e_batch)
    ]
    engine.run(params, requests)  # compiles, then runs once
    compile_s = engine.programs.seconds
    results: list[Any] = []
    seconds = median_seconds(lambda: results.append(engine.run(params, requests)), sizes.repeats)
    tokens = sum(len(g.token_ids) for g in results[-1])
    if tokens != sizes.e2e_batch * sizes.e2e_tokens:
        raise RuntimeError(f"expected {sizes.e2e_batch * sizes.e2e_tokens} tokens, got {tokens}")
    audio_s = sizes.e2e_batch * sizes.clip_seconds
    return {"model": sizes.asr_model, "batch": sizes.e2e_batch, "clip_seconds": sizes.clip_seconds,
            "new_tokens": sizes.e2e_tokens, "seconds": seconds, "audio_s_per_s": audio_s / seconds,
            "rtf": seconds / audio_s, "tokens_per_s": tokens / seconds, "compile_s": compile_s,
            "paper_audio_s_per_s": PAPER_ASR_AUDIO_S_PER_S}  # fmt: skip


def aligner(sizes: Sizes) -> dict[str, Any]:
    """``Qwen3ForcedAligner.align`` of ``aligner_batch`` clips with their words, in one forward pass."""
    import jax.numpy as jnp

    from qasr_jax import text as text_io
    from qasr_jax.aligner import Qwen3ForcedAligner

    config = common.thinker_config(sizes.aligner_model)
    params = bf16_params(sizes.aligner_model)
    with tempfile.TemporaryDirectory() as directory:
        common.vocab.write_tokenizer_files(directory)
        tokenizer = text_io.Tokenizer.from_pretrained(directory, follow_official_loader=False)
    n = sizes.aligner_batch
    model = Qwen3ForcedAligner(config, params, tokenizer, dtype=jnp.bfloat16, max_batch_size=n,
                               max_batch_tokens=n * 4096)  # fmt: skip
    clip = speech_clip(sizes.clip_seconds)
    audios = [(np.roll(clip, 1600 * i), SAMPLE_RATE) for i in range(n)]
    texts = [aligner_words(sizes.clip_seconds)] * n
    started = time.perf_counter()
    model.precompile(audios, texts, "English")
    compile_s = time.perf_counter() - started
    model.align(audios, texts, "English", strict=True)
    seconds = median_seconds(lambda: model.align(audios, texts, "English", strict=True), sizes.repeats)
    return {"model": sizes.aligner_model, "batch": n, "clip_seconds": sizes.clip_seconds,
            "words": len(texts[0].split()), "programs": model.compiled_programs, "seconds": seconds,
            "audio_s_per_s": n * sizes.clip_seconds / seconds, "compile_s": compile_s,
            "paper_audio_s_per_s": PAPER_ALIGNER_AUDIO_S_PER_S}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Running and reporting


@contextlib.contextmanager
def _section(report: dict[str, Any], name: str) -> Iterator[dict[str, Any]]:
    """Record one section's result, time, peak memory and, if it raised, the traceback (the suite carries on:
    one short run on a borrowed machine should bring back everything that works)."""
    entry: dict[str, Any] = {"status": "running"}
    report["sections"][name] = entry
    print(f"[{name}] ...", flush=True)
    started = time.perf_counter()
    try:
        yield entry
        entry["status"] = "ok"
    except Exception as error:  # recorded in the report: see the docstring
        entry["status"] = "failed"
        entry["error"] = f"{type(error).__name__}: {error}"
        entry["traceback"] = traceback.format_exc()
    entry["wall_s"] = time.perf_counter() - started
    entry["peak_device_gb"] = peak_device_gb()
    entry["peak_host_gb"] = peak_rss_gb()
    print(f"[{name}] {entry['status']} in {entry['wall_s']:.1f} s" + (f": {entry['error']}" if "error" in entry
          else ""), flush=True)  # fmt: skip


def run_suite(
    sizes: Sizes,
    out_dir: str,
    sections: tuple[str, ...] = SECTIONS,
    tiny: bool = False,
    budget_s: float = 450.0,
) -> dict:
    """Run ``sections`` at ``sizes``, write ``report.json`` and ``report.md`` into ``out_dir``; the report.

    A section is not started once ``budget_s`` seconds have passed (it is reported as skipped)."""
    os.makedirs(out_dir, exist_ok=True)
    hw = hardware()
    print(f"hardware: {hw['devices']} × {hw['device_kind']} ({hw['platform']}), "
          f"{_gb(hw['device_memory_gb'])} GB device memory, {hw['host_cpus']} host CPUs, jax {hw['jax']}",
          flush=True)  # fmt: skip
    report: dict[str, Any] = {
        "tiny": tiny,
        "hardware": hw,
        "sizes": dataclasses.asdict(sizes),
        "paper": {
            "asr_0.6b_vllm_concurrency_128_audio_s_per_s": PAPER_ASR_AUDIO_S_PER_S,
            "aligner_0.6b_audio_s_per_s": PAPER_ALIGNER_AUDIO_S_PER_S,
        },
        "load_average_start": os.getloadavg(),
        "sections": {},
    }
    started = time.perf_counter()
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "kernel_tests": lambda: kernel_tests(sizes, out_dir),
        "kernel_timing": lambda: kernel_timing(sizes),
        "encoder": lambda: encoder(sizes),
        "decode": lambda: decode(sizes),
        "end_to_end": lambda: end_to_end(sizes),
        "aligner": lambda: aligner(sizes),
    }
    for name in sections:
        if time.perf_counter() - started > budget_s:
            report["sections"][name] = {"status": "skipped", "error": f"the {budget_s:.0f} s budget was spent",
                                        "wall_s": 0.0, "peak_device_gb": None, "peak_host_gb": peak_rss_gb()}  # fmt: skip
            continue
        with _section(report, name) as entry:
            entry["result"] = runners[name]()
    report["total_s"] = time.perf_counter() - started
    report["load_average_end"] = os.getloadavg()
    with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    markdown = render_markdown(report)
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(markdown)
    print(markdown)
    return report


def _gb(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _num(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: the hardware, then one part per section."""
    hw = report["hardware"]
    lines = [
        f"# Accelerator suite{' (--tiny)' if report['tiny'] else ''}",
        "",
        f"{hw['devices']} × {hw['device_kind']} ({hw['platform']}), {_gb(hw['device_memory_gb'])} GB device "
        f"memory; host {hw['host_cpus']} CPUs; jax {hw['jax']}, jaxlib {hw['jaxlib']}; total "
        f"{report.get('total_s', 0):.0f} s; load average {report['load_average_start'][0]:.2f} at the start, "
        f"{report.get('load_average_end', [float('nan')])[0]:.2f} at the end.",
        "",
        "| section | status | wall s | peak device GB | peak host GB |",
        "|---|---|---:|---:|---:|",
    ]
    for name, entry in report["sections"].items():
        lines.append(f"| {name} | {entry['status']} | {entry['wall_s']:.1f} | {_gb(entry['peak_device_gb'])} | "
                     f"{_gb(entry['peak_host_gb'])} |")  # fmt: skip
    for name, entry in report["sections"].items():
        lines += ["", f"## {name}", ""]
        if entry["status"] != "ok":
            lines += [f"**{entry['status']}**: `{entry.get('error', '')}`"]
            continue
        lines += _RENDERERS[name](entry["result"])
    return "\n".join(lines) + "\n"


def _render_kernel_tests(r: dict[str, Any]) -> list[str]:
    lines = [f"`{r['command']}` ({r['mode']}): {r['passed']} passed, {r['failures']} failed, {r['errors']} errors, "
             f"{r['skipped']} skipped of {r['tests']} in {r['seconds']:.0f} s."]  # fmt: skip
    lines += [f"- FAILED {f}" for f in r["failed"]]
    return lines


def _render_kernel_timing(r: dict[str, Any]) -> list[str]:
    mode = (
        "interpreted (CPU: not a kernel timing)" if r["interpreted"] else f"compiled ({r['target']} variant)"
    )
    lines = [f"Pallas {mode}, {r['dtype']}, forward; ms per call.", "",
             "| windowed attention | windows × tokens | heads × head_dim | XLA ms | Pallas ms | XLA/Pallas |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for w in r["windowed"]:
        lines.append(f"| {w['model']} encoder | {w['windows']} × {w['window']} | {w['heads']} × {w['head_dim']} | "
                     f"{_num(w['xla_ms'], 3)} | {_num(w['pallas_ms'], 3)} | {_num(w['speedup'])} |")  # fmt: skip
    lines += ["", "| decode attention (one layer) | batch | cache | q/kv heads × head_dim | XLA ms | Pallas ms | "
              "XLA/Pallas |", "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for d in r["decode"]:
        lines.append(f"| {d['models']} decoder | {d['batch']} | {d['cache']} | {d['q_heads']}/{d['kv_heads']} × "
                     f"{d['head_dim']} | {_num(d['xla_ms'], 3)} | {_num(d['pallas_ms'], 3)} | "
                     f"{_num(d['speedup'])} |")  # fmt: skip
    return lines


def _render_encoder(r: dict[str, Any]) -> list[str]:
    return [f"{r['model']} bf16, batch {r['batch']} × {r['clip_seconds']:g} s ({r['frames']} mel frames): "
            f"{_num(r['seconds'], 3)} s, **{_num(r['audio_s_per_s'], 0)} audio-s/s**; compile "
            f"{_num(r['compile_s'], 1)} s."]  # fmt: skip


def _render_decode(r: dict[str, Any]) -> list[str]:
    lines = [f"{r['model']} bf16, one greedy step of every slot (the engine's loop).", "",
             "| batch (slots) | context | steps | ms/step | tokens/s | compile s |", "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for row in r["rows"]:
        lines.append(f"| {row['batch']} ({row['slots']}) | {row['context']} | {row['steps']} | {_num(row['step_ms'], 3)} | "
                     f"{_num(row['tokens_per_s'], 0)} | {_num(row['compile_s'], 1)} |")  # fmt: skip
    return lines


def _render_end_to_end(r: dict[str, Any]) -> list[str]:
    return [f"{r['model']} bf16, {r['batch']} × {r['clip_seconds']:g} s, {r['new_tokens']} new tokens each (end "
            f"tokens suppressed): {_num(r['seconds'], 3)} s, **{_num(r['audio_s_per_s'], 0)} audio-s/s** (RTF "
            f"{_num(r['rtf'], 4)}), {_num(r['tokens_per_s'], 0)} tokens/s; compile {_num(r['compile_s'], 1)} s. "
            f"Paper, 0.6B on vLLM at concurrency 128: about {r['paper_audio_s_per_s']:,.0f} audio-s/s."]  # fmt: skip


def _render_aligner(r: dict[str, Any]) -> list[str]:
    return [f"{r['model']} bf16, {r['batch']} × {r['clip_seconds']:g} s with {r['words']} words each, "
            f"{r['programs']} program(s): {_num(r['seconds'], 3)} s, **{_num(r['audio_s_per_s'], 0)} "
            f"audio-s/s**; compile {_num(r['compile_s'], 1)} s. Paper: about {r['paper_audio_s_per_s']:,.0f} "
            "audio-s/s."]  # fmt: skip


_RENDERERS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "kernel_tests": _render_kernel_tests,
    "kernel_timing": _render_kernel_timing,
    "encoder": _render_encoder,
    "decode": _render_decode,
    "end_to_end": _render_end_to_end,
    "aligner": _render_aligner,
}


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser("benchmarks.accelerator_suite", __doc__)
    parser.add_argument("--out", required=True, metavar="DIR", help="where report.json and report.md go")
    parser.add_argument("--tiny", action="store_true", help="tiny configs and sizes (CPU, CI)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="comma-separated subset of: " + ", ".join(SECTIONS))  # fmt: skip
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="start no section after this many seconds (default %(default)s)")  # fmt: skip
    args = parser.parse_args(argv)
    sections = tuple(s for s in args.sections.split(",") if s)
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    report = run_suite(
        TINY if args.tiny else FULL, args.out, sections, tiny=args.tiny, budget_s=args.budget_s
    )
    return 0 if all(entry["status"] == "ok" for entry in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
