"""Typed, frozen model configs read from a checkpoint's config.json.

The released config.json nests everything under ``thinker_config`` (``audio_config``, ``text_config`` and the
token ids). Token ids are read from the file and never defaulted: the official config class defaults are not
the released values.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from qasr_jax.errors import ConfigError


def conv_out_len(n: int) -> int:
    """Length after one stride-2, kernel-3, pad-1 convolution: (n - 1) // 2 + 1, and 0 for n = 0."""
    return (n - 1) // 2 + 1 if n > 0 else 0


def chunk_tokens(frames: int) -> int:
    """Encoder tokens produced by a chunk of ``frames`` mel frames (three stride-2 convolutions)."""
    return conv_out_len(conv_out_len(conv_out_len(frames)))


@dataclasses.dataclass(frozen=True)
class AudioEncoderConfig:
    """The AuT audio encoder (``thinker_config.audio_config``)."""

    num_mel_bins: int
    d_model: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    output_dim: int
    n_window: int
    n_window_infer: int
    downsample_hidden_size: int
    max_source_positions: int
    conv_chunksize: int = 500
    activation_function: str = "gelu"
    layer_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def chunk_frames(self) -> int:
        """Mel frames per encoder chunk (2·n_window; 100 = 1 s in the released models)."""
        return 2 * self.n_window

    @property
    def tokens_per_chunk(self) -> int:
        return chunk_tokens(self.chunk_frames)

    @property
    def window_chunks(self) -> int:
        """Chunks per attention window at inference (n_window_infer / chunk_frames; 8 = 8 s released)."""
        return self.n_window_infer // self.chunk_frames

    @property
    def window_frames(self) -> int:
        """Mel frames per attention window at inference (800 = 8 s released); batches of audio are padded to
        whole windows."""
        return self.chunk_frames * self.window_chunks

    def output_length(self, frames: int) -> int:
        """Encoder output tokens for an audio of ``frames`` mel frames."""
        full, rest = divmod(int(frames), self.chunk_frames)
        return full * self.tokens_per_chunk + chunk_tokens(rest)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Qwen3 decoder (``thinker_config.text_config``)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    mrope_interleaved: bool
    tie_word_embeddings: bool
    hidden_act: str = "silu"
    max_position_embeddings: int = 65536

    @property
    def kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


@dataclasses.dataclass(frozen=True)
class ThinkerConfig:
    """The whole thinker: encoder, decoder, token ids, and the head (vocabulary or aligner classes)."""

    audio: AudioEncoderConfig
    text: TextConfig
    audio_token_id: int
    audio_start_token_id: int | None = None
    audio_end_token_id: int | None = None
    is_aligner: bool = False
    classify_num: int | None = None
    timestamp_token_id: int | None = None
    timestamp_segment_time: float | None = None

    @property
    def head_size(self) -> int:
        """Rows of the output head: aligner classes or the vocabulary."""
        return self.classify_num if self.is_aligner else self.text.vocab_size

    @property
    def tied_head(self) -> bool:
        return self.text.tie_word_embeddings and not self.is_aligner

    def replace(self, **changes: Any) -> ThinkerConfig:
        return dataclasses.replace(self, **changes)


def _require(d: dict, key: str, where: str, source: str) -> Any:
    if key not in d or d[key] is None:
        raise ConfigError(f"{source}: field '{where}{key}' is missing")
    return d[key]


def _typed(value: Any, kind: type, name: str, source: str) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: field '{name}' must be true/false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{source}: field '{name}' must be a non-negative integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: field '{name}' must be a number, got {value!r}")
        return float(value)
    raise AssertionError(kind)


def _audio_config(d: dict, source: str) -> AudioEncoderConfig:
    w = "thinker_config.audio_config."
    ints = [
        "num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "output_dim",
        "n_window", "n_window_infer", "downsample_hidden_size", "max_source_positions",
    ]  # fmt: skip
    kw = {k: _typed(_require(d, k, w, source), int, w + k, source) for k in ints}
    if "conv_chunksize" in d:
        kw["conv_chunksize"] = _typed(d["conv_chunksize"], int, w + "conv_chunksize", source)
    act = d.get("activation_function", "gelu")
    if act != "gelu":
        raise ConfigError(f"{source}: {w}activation_function {act!r} is not supported (only 'gelu')")
    if d.get("scale_embedding", False):
        raise ConfigError(f"{source}: {w}scale_embedding=true is not supported")
    cfg = AudioEncoderConfig(activation_function=act, **kw)
    for k in ("d_model", "encoder_attention_heads", "n_window", "num_mel_bins", "encoder_layers"):
        if getattr(cfg, k) <= 0:
            raise ConfigError(f"{source}: {w}{k} must be positive, got {getattr(cfg, k)}")
    if cfg.d_model % cfg.encoder_attention_heads:
        raise ConfigError(
            f"{source}: {w}encoder_attention_heads ({cfg.encoder_attention_heads}) does not divide "
            f"d_model ({cfg.d_model})"
        )
    if cfg.d_model % 2:
        raise ConfigError(f"{source}: {w}d_model must be even for sinusoidal positions, got {cfg.d_model}")
    if cfg.n_window_infer < cfg.chunk_frames or cfg.n_window_infer % cfg.chunk_frames:
        raise ConfigError(
            f"{source}: {w}n_window_infer ({cfg.n_window_infer}) must be a positive multiple of "
            f"2*n_window ({cfg.chunk_frames})"
        )
    if cfg.tokens_per_chunk > cfg.max_source_positions:
        raise ConfigError(f"{source}: {w}max_source_positions is smaller than the tokens of one chunk")
    return cfg


def _text_config(d: dict, source: str) -> TextConfig:
    w = "thinker_config.text_config."
    ints = [
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads",
    ]  # fmt: skip
    kw = {k: _typed(_require(d, k, w, source), int, w + k, source) for k in ints}
    for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "vocab_size"):
        if kw[k] <= 0:
            raise ConfigError(f"{source}: {w}{k} must be positive, got {kw[k]}")
    head_dim = d.get("head_dim") or kw["hidden_size"] // kw["num_attention_heads"]
    head_dim = _typed(head_dim, int, w + "head_dim", source)
    if head_dim % 2:
        raise ConfigError(f"{source}: {w}head_dim must be even for rotary embeddings, got {head_dim}")
    if kw["num_attention_heads"] % kw["num_key_value_heads"]:
        raise ConfigError(
            f"{source}: {w}num_key_value_heads ({kw['num_key_value_heads']}) does not divide "
            f"num_attention_heads ({kw['num_attention_heads']})"
        )
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: {w}hidden_act {d.get('hidden_act')!r} is not supported (only 'silu')")
    if d.get("attention_bias", False):
        raise ConfigError(f"{source}: {w}attention_bias=true is not supported")
    scaling = d.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"{source}: {w}rope_scaling type {rope_type!r} is not supported (only 'default')")
    section = tuple(scaling.get("mrope_section", (head_dim // 2, 0, 0)))
    if len(section) != 3 or sum(section) != head_dim // 2:
        raise ConfigError(
            f"{source}: {w}rope_scaling.mrope_section {list(section)} must have 3 parts summing to "
            f"head_dim/2 = {head_dim // 2}"
        )
    interleaved = bool(scaling.get("mrope_interleaved", scaling.get("interleaved", True)))
    return TextConfig(
        head_dim=head_dim,
        rms_norm_eps=_typed(d.get("rms_norm_eps", 1e-6), float, w + "rms_norm_eps", source),
        rope_theta=_typed(_require(d, "rope_theta", w, source), float, w + "rope_theta", source),
        mrope_section=section,  # type: ignore[arg-type]
        mrope_interleaved=interleaved,
        tie_word_embeddings=_typed(
            d.get("tie_word_embeddings", False), bool, w + "tie_word_embeddings", source
        ),
        max_position_embeddings=int(d.get("max_position_embeddings", 65536)),
        **kw,
    )


def config_from_dict(raw: dict, source: str = "config.json") -> ThinkerConfig:
    """Build and validate a ThinkerConfig from the parsed top-level config.json."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object at the top level")
    thinker = raw.get("thinker_config")
    if (
        thinker is None
        and isinstance(raw.get("audio_config"), dict)
        and isinstance(raw.get("text_config"), dict)
    ):
        thinker = raw  # transformers-native exports keep the sub-configs at the top level
    if not isinstance(thinker, dict):
        raise ConfigError(f"{source}: field 'thinker_config' is missing (is this a Qwen3-ASR checkpoint?)")
    audio_raw = _require(thinker, "audio_config", "thinker_config.", source)
    text_raw = _require(thinker, "text_config", "thinker_config.", source)
    audio = _audio_config(audio_raw, source)
    text = _text_config(text_raw, source)
    if audio.output_dim != text.hidden_size:
        raise ConfigError(
            f"{source}: audio_config.output_dim ({audio.output_dim}) must equal text_config.hidden_size "
            f"({text.hidden_size}): audio embeddings replace token embeddings"
        )
    w = "thinker_config."
    audio_token_id = _typed(_require(thinker, "audio_token_id", w, source), int, w + "audio_token_id", source)
    if audio_token_id >= text.vocab_size:
        raise ConfigError(
            f"{source}: {w}audio_token_id {audio_token_id} is outside the vocabulary ({text.vocab_size})"
        )
    optional_ids = {}
    for k in ("audio_start_token_id", "audio_end_token_id"):
        if thinker.get(k) is not None:
            optional_ids[k] = _typed(thinker[k], int, w + k, source)
    is_aligner = "forced_aligner" in str(thinker.get("model_type", "")) or "forced_aligner" in str(
        raw.get("model_type", "")
    )
    aligner_kw: dict[str, Any] = {}
    if is_aligner:
        aligner_kw["classify_num"] = _typed(
            _require(thinker, "classify_num", w, source), int, w + "classify_num", source
        )
        if aligner_kw["classify_num"] <= 0:
            raise ConfigError(f"{source}: {w}classify_num must be positive")
        aligner_kw["timestamp_token_id"] = _typed(
            _require(raw, "timestamp_token_id", "", source), int, "timestamp_token_id", source
        )
        aligner_kw["timestamp_segment_time"] = _typed(
            _require(raw, "timestamp_segment_time", "", source), float, "timestamp_segment_time", source
        )
        if aligner_kw["timestamp_segment_time"] <= 0:
            raise ConfigError(f"{source}: timestamp_segment_time must be positive")
    return ThinkerConfig(audio=audio, text=text, audio_token_id=audio_token_id, is_aligner=is_aligner,
                         **optional_ids, **aligner_kw)  # fmt: skip


def load_config(path: str | os.PathLike) -> ThinkerConfig:
    """Read ``config.json`` from a checkpoint dir (or the file itself)."""
    path = os.fspath(path)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise ConfigError(f"{file}: no config.json (expected a Qwen3-ASR checkpoint directory)")
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from e
    return config_from_dict(raw, source=file)


def config_to_dict(cfg: ThinkerConfig) -> dict:
    """The released config.json layout for ``cfg`` (inverse of ``config_from_dict``)."""
    a, t = cfg.audio, cfg.text
    thinker: dict[str, Any] = {
        "audio_config": {
            "num_mel_bins": a.num_mel_bins, "d_model": a.d_model, "encoder_layers": a.encoder_layers,
            "encoder_attention_heads": a.encoder_attention_heads, "encoder_ffn_dim": a.encoder_ffn_dim,
            "output_dim": a.output_dim, "n_window": a.n_window, "n_window_infer": a.n_window_infer,
            "downsample_hidden_size": a.downsample_hidden_size, "max_source_positions": a.max_source_positions,
            "conv_chunksize": a.conv_chunksize, "activation_function": a.activation_function,
        },
        "text_config": {
            "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads, "head_dim": t.head_dim, "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta, "tie_word_embeddings": t.tie_word_embeddings, "hidden_act": t.hidden_act,
            "max_position_embeddings": t.max_position_embeddings,
            "rope_scaling": {"rope_type": "default", "mrope_section": list(t.mrope_section),
                             "interleaved": t.mrope_interleaved, "mrope_interleaved": t.mrope_interleaved},
        },
        "audio_token_id": cfg.audio_token_id,
        "model_type": "qwen3_forced_aligner" if cfg.is_aligner else "qwen3_asr_thinker",
    }  # fmt: skip
    for k in ("audio_start_token_id", "audio_end_token_id"):
        if getattr(cfg, k) is not None:
            thinker[k] = getattr(cfg, k)
    out: dict[str, Any] = {"model_type": "qwen3_asr", "architectures": ["Qwen3ASRForConditionalGeneration"]}
    if cfg.is_aligner:
        thinker["classify_num"] = cfg.classify_num
        out["timestamp_token_id"] = cfg.timestamp_token_id
        out["timestamp_segment_time"] = cfg.timestamp_segment_time
    out["thinker_config"] = thinker
    return out
