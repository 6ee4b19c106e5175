"""What several benchmarks share: random-weight checkpoints, speech, timing, memory, the load average, worker
processes and the roofline model of a transcription run.

The benchmarks import the library, this module and nothing of each other. The official-reference helpers of
``tests/support`` reach them only through here: ``common.official``, ``common.speech``, ``common.media`` and
``common.vocab`` are those modules, imported on first use (torch and the official package are imported only
inside their functions, so a benchmark that needs neither, like the accelerator suite, runs without them).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from qasr_jax.config import ThinkerConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_RATE = 16000
HOP = 160
EOS_TOKEN_IDS = (151645, 151643)  # <|im_end|>, <|endoftext|>: suppressed to generate an exact token count
WORKDIR = os.path.join(tempfile.gettempdir(), "qasr_bench")  # where built checkpoints are cached
TOKENS_PER_SECOND = 13  # one 100-frame mel chunk (1 s) becomes 13 encoder tokens

_SUPPORT = ("media", "official", "speech", "vocab")


def __getattr__(name: str) -> ModuleType:
    """``common.official`` and the other ``tests.support`` modules, imported when first asked for."""
    if name in _SUPPORT:
        return importlib.import_module(f"tests.support.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------------------------
# Configs and checkpoints


def official_config(name: str) -> dict[str, Any]:
    """The config.json dict of a released size (``"asr-0.6b"``, ``"asr-1.7b"``, ``"aligner-0.6b"``) or of one of
    the test suite's tiny configs (``"small-asr"``, ``"small-aligner"``)."""
    official = __getattr__("official")
    if name == "small-asr":
        return official.small_asr_config()
    if name == "small-aligner":
        return official.small_aligner_config()
    return official.real_config(name)


def thinker_config(name: str) -> ThinkerConfig:
    """The ``ThinkerConfig`` of ``official_config(name)``."""
    from qasr_jax.config import config_from_dict

    return config_from_dict(official_config(name))


def build_once(path: str, config: dict[str, Any], label: str, **options: Any) -> str:
    """``path``, holding a checkpoint of ``config`` with random weights (seed 0, scaled so that every part of the
    model matters), which the official code builds the first time. It is built in a staging dir beside ``path``
    and then moved there, so an interrupted build leaves nothing half-written. ``options`` go to
    ``official.build_checkpoint`` (``dtype``, ``max_shard_bytes``)."""
    if not os.path.exists(os.path.join(path, "config.json")):
        print(f"building {label} with random weights in {path} ...", file=sys.stderr, flush=True)
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".building-", dir=parent)
        __getattr__("official").build_checkpoint(staging, config, seed=0, **options)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(staging, path)
    return path


def random_checkpoint(model: str, workdir: str = WORKDIR) -> str:
    """``workdir/{model}-random``: the config ``model`` names (see ``official_config``) with random weights."""
    return build_once(os.path.join(workdir, f"{model}-random"), official_config(model), model)


def small_checkpoint(workdir: str) -> str:
    """The small test checkpoint under ``workdir``, named by a digest of its config (a changed config builds
    anew)."""
    config = official_config("small-asr")
    digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    return build_once(os.path.join(workdir, f"checkpoint-{digest}"), config, "the small test config")


def argument_parser(module: str, doc: str, epilog: bool = False) -> argparse.ArgumentParser:
    """The parser of ``python -m module``, its docstring ``doc`` as the description, kept as written; with
    ``epilog``, the first paragraph is the description and the rest follows the options."""
    first, _, rest = doc.partition("\n\n")
    return argparse.ArgumentParser(
        prog=f"python -m {module}",
        description=first if epilog else doc,
        epilog=rest if epilog else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_checkpoint_arguments(
    parser: argparse.ArgumentParser, models: Sequence[str] = ("asr-0.6b", "asr-1.7b")
) -> None:
    """``--model`` (a config built with random weights; ``"small"``: the test suite's tiny ASR config),
    ``--checkpoint DIR`` and ``--workdir`` (see ``checkpoint_dir``)."""
    parser.add_argument("--model", default=models[0], choices=models,
                        help="config to build with random weights (default %(default)s)")  # fmt: skip
    parser.add_argument("--checkpoint", metavar="DIR", help="use this checkpoint dir instead of building one")
    parser.add_argument(
        "--workdir", default=WORKDIR, help="where built checkpoints are cached (default %(default)s)"
    )


def add_streaming_arguments(parser: argparse.ArgumentParser) -> None:
    """The checkpoint (``add_checkpoint_arguments``, with ``small``), the update period, the token budget, the
    prefix rule and the dtype of a streaming benchmark."""
    add_checkpoint_arguments(parser, ("asr-0.6b", "asr-1.7b", "small"))
    parser.add_argument(
        "--chunk-seconds", type=float, default=2.0, help="update period (default %(default)s)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=16, help="token budget per update")
    parser.add_argument("--empty-prefix", action="store_true", help="no text prefix in any update")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))


def checkpoint_dir(args: argparse.Namespace) -> str:
    """``args.checkpoint``, or the random-weight checkpoint of ``args.model`` under ``args.workdir``."""
    if args.checkpoint:
        return args.checkpoint
    return random_checkpoint("small-asr" if args.model == "small" else args.model, args.workdir)


def random_params(model: Any, seed: int = 0) -> Any:
    """Params of ``model`` (a ``Qwen3ASR``) from its own initialisers, in its param dtype, made on the device."""
    import flax
    import jax
    import jax.numpy as jnp

    cfg = model.config

    def init() -> Any:
        ids = jnp.zeros((1, 4), jnp.int32)
        feats = jnp.zeros((1, cfg.audio.num_mel_bins, cfg.audio.chunk_frames), jnp.float32)
        fmask = jnp.ones((1, cfg.audio.chunk_frames), jnp.int32)
        variables = model.init(jax.random.key(seed, impl="rbg"), ids, jnp.ones_like(ids), feats, fmask)
        return flax.core.meta.unbox(variables["params"])

    return jax.block_until_ready(jax.jit(init)())


# ----------------------------------------------------------------------------------------------------------------
# Speech


def tiled(clip: np.ndarray, samples: int) -> np.ndarray:
    """``clip`` repeated along its first axis to exactly ``samples`` samples."""
    return np.tile(clip, (-(-samples // len(clip)),) + (1,) * (clip.ndim - 1))[:samples]


def speech_clip(seconds: float) -> np.ndarray:
    """``seconds`` of English speech at 16 kHz (espeak-ng, repeated), or seeded noise where espeak-ng is
    missing."""
    speech = __getattr__("speech")
    if speech.have_espeak():
        clip = speech.synth(speech.LONG_EN)
    else:
        clip = (0.1 * np.random.default_rng(0).standard_normal(20 * SAMPLE_RATE)).astype(np.float32)
    return tiled(clip, int(seconds * SAMPLE_RATE))


def speech_and_text(seconds: float) -> tuple[np.ndarray, str]:
    """``seconds`` of espeak-ng English speech (a paragraph repeated, 16 kHz float32) and the words it speaks."""
    speech = __getattr__("speech")
    clip = speech.synth(speech.LONG_EN)
    samples = tiled(clip, int(seconds * SAMPLE_RATE))
    repeats = -(-len(samples) // len(clip))
    words = speech.LONG_EN.split() * repeats
    spoken = max(1, round(len(words) * len(samples) / (len(clip) * repeats)))
    return samples, " ".join(words[:spoken])


def clip_window_lengths(num_clips: int, clip_seconds: int, window: int) -> np.ndarray:
    """Valid tokens of every encoder attention window when ``num_clips`` clips of ``clip_seconds`` are laid into
    windows of ``window`` tokens.

    Returns int32 ``[num_windows]``: each clip fills whole windows and leaves a ragged last one.
    """
    tokens = clip_seconds * TOKENS_PER_SECOND
    full, rest = divmod(tokens, window)
    per_clip = [window] * full + ([rest] if rest else [])
    return np.asarray(per_clip * num_clips, np.int32)


# ----------------------------------------------------------------------------------------------------------------
# Timing, memory and the load average


def median_seconds(
    call: Callable[[], Any], repeats: int, setup_seconds: Callable[[], float] = lambda: 0.0
) -> float:
    """Median wall time of ``repeats`` calls of ``call`` (at least one), each less the growth of
    ``setup_seconds()`` during it (a compile-time counter: a call that compiles is timed as if its program had
    been there)."""
    times = []
    for _ in range(max(1, repeats)):
        setup = setup_seconds()
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started - (setup_seconds() - setup))
    return statistics.median(times)


def best_seconds(call: Callable[[], Any], repeats: int) -> float:
    """The fastest of ``repeats`` calls of ``call`` (others' load only slows a call down)."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best


def jax_median_ms(call: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``call`` in milliseconds, its results waited for, after one untimed call that
    compiles it."""
    import jax

    jax.block_until_ready(call())
    return 1e3 * median_seconds(lambda: jax.block_until_ready(call()), repeats)


def peak_rss_gb() -> float:
    """This process's peak resident memory so far, in GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def proc_status_kib(field: str) -> int:
    """A memory figure of this process from ``/proc/self/status`` in KiB (``VmRSS``, ``VmHWM``: its own peak,
    which ``ru_maxrss`` would carry over from the parent across exec)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def load_average(values: Sequence[float] | None = None, sep: str = " ") -> str:
    """The 1, 5 and 15 minute load average (now, or ``values`` taken earlier), two decimals each."""
    return sep.join(f"{x:.2f}" for x in (os.getloadavg() if values is None else values))


# ----------------------------------------------------------------------------------------------------------------
# Worker processes


def run_module(module: str, *args: str, capture: bool = False) -> str:
    """``python -m module args`` in a fresh process, with this repository on its path; its stdout when
    ``capture`` (otherwise it shares ours). A failure raises ``CalledProcessError``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    sys.stdout.flush()
    sys.stderr.flush()
    done = subprocess.run([sys.executable, "-m", module, *args], check=True, env=env, text=True,
                          stdout=subprocess.PIPE if capture else None)  # fmt: skip
    return done.stdout if capture else ""


def run_worker(module: str, *args: str) -> dict[str, Any]:
    """``python -m module args --result FILE`` in a fresh process (so that its peak memory is its own); what it
    wrote to FILE with ``write_result``."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result = handle.name
    try:
        run_module(module, *args, "--result", result)
        with open(result, encoding="utf-8") as f:
            return json.load(f)
    finally:
        os.unlink(result)


def write_result(path: str, result: dict[str, Any]) -> None:
    """A worker's measurements, for ``run_worker``."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f)


# ----------------------------------------------------------------------------------------------------------------
# Roofline: this machine's ceilings and the work of a transcription run (``python -m benchmarks.roofline``)


@dataclasses.dataclass(frozen=True)
class Ceilings:
    gemm_gflops: float
    stream_gbps: float


@dataclasses.dataclass(frozen=True)
class Work:
    encoder_gflop_per_clip: float
    prompt_tokens: int
    prefill_gflop: float
    decode_bytes_per_step: float


def measure_ceilings(repeats: int = 5) -> Ceilings:
    """fp32 GEMM GFLOP/s (a [3200, 1024] × [1024, 3072] product, the prefill's MLP shape) and memory-streaming
    GB/s (XLA summing 1 GiB of fp32), each the best of ``repeats``."""
    import jax
    import jax.numpy as jnp

    def best(fn, *args) -> float:
        jax.block_until_ready(fn(*args))
        return best_seconds(lambda: jax.block_until_ready(fn(*args)), repeats)

    rng = np.random.default_rng(0)
    dot = jax.jit(jnp.dot)
    m, k, n = 3200, 1024, 3072
    a = jnp.asarray(rng.standard_normal((m, k), np.float32))
    b = jnp.asarray(rng.standard_normal((k, n), np.float32))
    gemm = 2 * m * k * n / best(dot, a, b) / 1e9
    del a, b
    # Memory: XLA summing 1 GiB of fp32 (a decode step is bound by reading its weights once).
    w = jnp.asarray(rng.standard_normal((256, 1024, 1024), np.float32))
    stream = w.size * 4 / best(jax.jit(jnp.sum), w) / 1e9
    return Ceilings(gemm, stream)


def encoder_gflop(config: ThinkerConfig, seconds: float) -> float:
    """GFLOP of the audio encoder for one clip: the conv front end per chunk of ``n_window * 2`` frames, the
    transformer layers over the clip's tokens, and the output projections (attention scores left out: they are
    windowed and small)."""
    from qasr_jax.config import conv_out_len

    audio = config.audio
    frames = int(seconds * SAMPLE_RATE) // HOP
    chunk = audio.chunk_frames
    chunks = -(-frames // chunk)
    c, mel = audio.downsample_hidden_size, audio.num_mel_bins
    f1, t1 = conv_out_len(mel), conv_out_len(chunk)
    f2, t2 = conv_out_len(f1), conv_out_len(t1)
    f3, t3 = conv_out_len(f2), conv_out_len(t2)
    conv = 2 * 9 * (f1 * t1 * c + f2 * t2 * c * c + f3 * t3 * c * c) + 2 * t3 * (c * f3) * audio.d_model
    tokens = audio.output_length(frames)
    d, ffn = audio.d_model, audio.encoder_ffn_dim
    layers = audio.encoder_layers * 2 * tokens * (4 * d * d + 2 * d * ffn)
    projections = 2 * tokens * (d * d + d * audio.output_dim)
    return (chunks * conv + layers + projections) / 1e9


def decoder_matmul_params(config: ThinkerConfig) -> int:
    """Weights of the decoder layers' matrix multiplies (norms left out)."""
    text = config.text
    h, inter = text.hidden_size, text.intermediate_size
    q = text.num_attention_heads * text.head_dim
    kv = text.num_key_value_heads * text.head_dim
    return text.num_hidden_layers * (h * q + 2 * h * kv + q * h + 3 * h * inter)


def prompt_tokens(checkpoint: str, config: ThinkerConfig, seconds: float) -> int:
    """Length of the ASR prompt for one clip (audio slot expanded), with the checkpoint's tokenizer."""
    from qasr_jax import audio as audio_io
    from qasr_jax import text as text_io

    tokenizer = text_io.Tokenizer.from_pretrained(checkpoint)
    frames = audio_io.num_frames(int(seconds * SAMPLE_RATE))
    return len(text_io.build_prompt_ids(tokenizer, config.audio.output_length(frames)))


def work(
    config: ThinkerConfig, seconds: float, prompt: int, batch: int, new_tokens: int, itemsize: int = 4
) -> Work:
    text = config.text
    params = decoder_matmul_params(config)
    prefill = 2 * params * prompt * batch / 1e9
    head = text.vocab_size * text.hidden_size
    context = prompt + new_tokens // 2  # the KV cache's mean length over the decode steps
    kv_bytes = (
        batch * text.num_hidden_layers * 2 * text.num_key_value_heads * text.head_dim * context * itemsize
    )
    return Work(encoder_gflop(config, seconds), prompt, prefill, (params + head) * itemsize + kv_bytes)


def floor_seconds(w: Work, c: Ceilings, batch: int, new_tokens: int) -> dict[str, float]:
    encoder = batch * w.encoder_gflop_per_clip / c.gemm_gflops
    prefill = w.prefill_gflop / c.gemm_gflops
    decode = (new_tokens - 1) * w.decode_bytes_per_step / (c.stream_gbps * 1e9)
    return {
        "encoder_s": encoder,
        "prefill_s": prefill,
        "decode_s": decode,
        "total_s": encoder + prefill + decode,
    }


def roofline_report(
    config: ThinkerConfig, seconds: float, prompt: int, batch: int, new_tokens: int, c: Ceilings
) -> str:
    w = work(config, seconds, prompt, batch, new_tokens)
    f = floor_seconds(w, c, batch, new_tokens)
    return "\n".join([
        f"ceilings (measured): fp32 GEMM {c.gemm_gflops:.0f} GFLOP/s; weight streaming {c.stream_gbps:.1f} GB/s",
        f"work: encoder {w.encoder_gflop_per_clip:.0f} GFLOP per {seconds:g} s clip; prefill {w.prefill_gflop:.0f} "
        f"GFLOP ({batch} × {w.prompt_tokens} prompt tokens); decode {w.decode_bytes_per_step / 1e9:.2f} GB per step",
        f"floor at b={batch}, {new_tokens} tokens: encoder {f['encoder_s']:.1f} s + prefill {f['prefill_s']:.1f} s + "
        f"decode {f['decode_s']:.1f} s = {f['total_s']:.1f} s",
    ])  # fmt: skip
