"""Reference helpers built on the official Qwen3-ASR code (``qwen-asr==0.0.6`` on torch/transformers).

Parity tests and benchmarks use this module to

* describe models: :func:`small_asr_config`, :func:`small_aligner_config` (tiny, fast on a CPU) and
  :func:`real_config` (the released sizes), all as complete top-level ``config.json`` dicts in the released layout;
* write checkpoint directories from the official model class with seeded random weights that are scaled so that
  every part of the model matters (:func:`build_checkpoint`, see :data:`WEIGHT_GAINS`), in the released
  ``thinker.*`` layout or the transformers-native "-hf" layout, fp32 or bf16, single-file or sharded, with the
  tokenizer, chat-template, preprocessor and generation files the official ``from_pretrained`` expects
  (:func:`hf_key` names the "-hf" tensors; :func:`checkpoint_tensors` reads back what was stored,
  :func:`official_state_dict` what the official loader makes of it);
* run the official model as the numerical reference, with the audio encoder's attention windows wired in on the
  CPU (:func:`load_official`, :func:`official_encoder_windows`, :func:`official_features`,
  :func:`official_encode`, :func:`official_logits`, :func:`make_audio_prompt_ids`, :func:`pad_features`);
* check that a model's weights matter (:func:`measure_weight_effects`).

torch, transformers and qwen_asr are test-only dependencies: they are imported inside the functions, so importing
this module is cheap.

Why the windows need wiring in: qwen-asr 0.0.6 restricts the encoder's attention to windows of
``13 * n_window_infer // (2 * n_window)`` tokens only through FlashAttention-2's ``cu_seqlens``. Under sdpa or
eager attention (every CPU run) ``Qwen3ASRAudioEncoder.forward`` never passes the block-diagonal mask, so the
encoder attends across the whole clip. The released model is trained and served windowed; the parity reference
is therefore the official encoder with that mask passed to every layer.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import os
import tempfile
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

# --------------------------------------------------------------------------------------------------------------
# Token ids of the released checkpoints (config.json / tokenizer). The official config classes default to other
# values (audio_token_id 151646, ...), so configs written here always carry these explicitly.
# --------------------------------------------------------------------------------------------------------------
ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645
AUDIO_START_ID = 151669
AUDIO_END_ID = 151670
AUDIO_PAD_ID = 151676
ASR_TEXT_ID = 151704
TIMESTAMP_ID = 151705
EOS_TOKEN_IDS = (IM_END_ID, ENDOFTEXT_ID)
PAD_TOKEN_ID = ENDOFTEXT_ID
TIMESTAMP_SEGMENT_TIME_MS = 80

SAMPLE_RATE = 16000
LAYOUTS = ("original", "hf")
DTYPES = ("float32", "bfloat16")

# --------------------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------------------

_SMALL_AUDIO: dict[str, Any] = {
    "num_mel_bins": 128,
    "d_model": 64,
    "encoder_layers": 2,
    "encoder_attention_heads": 4,
    "encoder_ffn_dim": 128,
    "downsample_hidden_size": 32,
    "output_dim": 64,
    "n_window": 50,
    "n_window_infer": 800,
    "conv_chunksize": 500,
    "max_source_positions": 1500,
    "activation_function": "gelu",
    "scale_embedding": False,
}

_SMALL_TEXT: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "hidden_act": "silu",
    "max_position_embeddings": 65536,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": {
        "rope_type": "default",
        "mrope_section": [4, 2, 2],
        "interleaved": True,
        "mrope_interleaved": True,
    },
    "attention_bias": False,
    "tie_word_embeddings": True,
}

# The released sizes (REFERENCE.md, "The three released checkpoints").
_REAL_SIZES: dict[str, dict[str, Any]] = {
    "asr-0.6b": {
        "audio": {"d_model": 896, "encoder_layers": 18, "encoder_attention_heads": 14, "encoder_ffn_dim": 3584,
                  "output_dim": 1024},
        "text": {"hidden_size": 1024, "intermediate_size": 3072, "vocab_size": 151936, "tie_word_embeddings": True},
        "aligner": False,
    },
    "asr-1.7b": {
        "audio": {"d_model": 1024, "encoder_layers": 24, "encoder_attention_heads": 16, "encoder_ffn_dim": 4096,
                  "output_dim": 2048},
        "text": {"hidden_size": 2048, "intermediate_size": 6144, "vocab_size": 151936, "tie_word_embeddings": True},
        "aligner": False,
    },
    "aligner-0.6b": {
        "audio": {"d_model": 1024, "encoder_layers": 24, "encoder_attention_heads": 16, "encoder_ffn_dim": 4096,
                  "output_dim": 1024},
        "text": {"hidden_size": 1024, "intermediate_size": 3072, "vocab_size": 152064, "tie_word_embeddings": False},
        "aligner": True,
        "classify_num": 5000,
    },
}  # fmt: skip


def _deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of `base` with `overrides` merged in; nested dicts merge key by key, other values replace."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _assemble_config(
    audio: dict[str, Any],
    text: dict[str, Any],
    *,
    aligner: bool,
    classify_num: int | None,
    tie_word_embeddings: bool | None,
    thinker: dict[str, Any] | None,
    top: dict[str, Any],
) -> dict[str, Any]:
    """A top-level config.json dict in the released layout from its parts (overrides already merged)."""
    text = dict(text)
    if tie_word_embeddings is not None:
        text["tie_word_embeddings"] = bool(tie_word_embeddings)
    if "output_dim" not in audio or audio["output_dim"] is None:
        audio = {**audio, "output_dim": text["hidden_size"]}
    thinker_config: dict[str, Any] = {
        "audio_config": audio,
        "text_config": text,
        "audio_token_id": AUDIO_PAD_ID,
        "audio_start_token_id": AUDIO_START_ID,
        "audio_end_token_id": AUDIO_END_ID,
        "initializer_range": 0.02,
        "model_type": "qwen3_forced_aligner" if aligner else "qwen3_asr_thinker",
    }
    if aligner:
        thinker_config["classify_num"] = int(classify_num if classify_num is not None else 5000)
    config: dict[str, Any] = {
        "architectures": ["Qwen3ASRForConditionalGeneration"],
        "model_type": "qwen3_asr",
        "thinker_config": _deep_merge(thinker_config, thinker or {}),
        "tie_word_embeddings": text["tie_word_embeddings"],
    }
    if aligner:
        config["timestamp_token_id"] = TIMESTAMP_ID
        config["timestamp_segment_time"] = TIMESTAMP_SEGMENT_TIME_MS
    else:
        config["support_languages"] = None
    return _deep_merge(config, top)


def small_asr_config(
    *,
    audio: dict[str, Any] | None = None,
    text: dict[str, Any] | None = None,
    thinker: dict[str, Any] | None = None,
    tie_word_embeddings: bool | None = None,
    **top: Any,
) -> dict[str, Any]:
    """A tiny ASR model's complete config.json dict in the released layout.

    Encoder: d_model 64, 2 layers, 4 heads, ffn 128, downsample_hidden_size 32, 128 mel bins, n_window 50,
    n_window_infer 800 (windows of 104 tokens), output_dim 64. Decoder: hidden 64, 2 layers, 4 query heads over 2
    kv heads (GQA 2), head_dim 16, intermediate 128, vocab 151936, rope_theta 1e6, interleaved MRoPE sections
    [4, 2, 2] (= head_dim / 2), tied head. Token ids at the released values.

    Overrides merge into the nested dicts: ``audio={"n_window_infer": 200}``, ``text={"num_key_value_heads": 4}``,
    ``thinker={...}`` (thinker_config fields), ``tie_word_embeddings=False`` (sets text_config's and the top-level
    flag); remaining keyword arguments are top-level fields. ``audio["output_dim"]`` follows ``text["hidden_size"]``
    unless given.
    """
    audio_cfg = _deep_merge(_SMALL_AUDIO, audio or {})
    if audio is None or "output_dim" not in audio:
        audio_cfg["output_dim"] = None
    return _assemble_config(
        audio_cfg,
        _deep_merge(_SMALL_TEXT, text or {}),
        aligner=False,
        classify_num=None,
        tie_word_embeddings=tie_word_embeddings,
        thinker=thinker,
        top=top,
    )


def small_aligner_config(
    *,
    audio: dict[str, Any] | None = None,
    text: dict[str, Any] | None = None,
    thinker: dict[str, Any] | None = None,
    classify_num: int = 400,
    tie_word_embeddings: bool | None = None,
    **top: Any,
) -> dict[str, Any]:
    """A tiny ForcedAligner's complete config.json dict in the released layout.

    Same sizes as :func:`small_asr_config` but vocab 152064, an untied head of `classify_num` classes,
    ``thinker_config.model_type = "qwen3_forced_aligner"``, and top-level ``timestamp_token_id`` 151705 and
    ``timestamp_segment_time`` 80. Overrides work as in :func:`small_asr_config`.
    """
    audio_cfg = _deep_merge(_SMALL_AUDIO, audio or {})
    if audio is None or "output_dim" not in audio:
        audio_cfg["output_dim"] = None
    text_cfg = _deep_merge({**_SMALL_TEXT, "vocab_size": 152064, "tie_word_embeddings": False}, text or {})
    return _assemble_config(
        audio_cfg,
        text_cfg,
        aligner=True,
        classify_num=classify_num,
        tie_word_embeddings=tie_word_embeddings,
        thinker=thinker,
        top=top,
    )


def real_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The config.json dict of a released model: ``"asr-0.6b"``, ``"asr-1.7b"`` or ``"aligner-0.6b"``.

    Sizes from REFERENCE.md's table; common to all three: 128 mel bins, downsample_hidden_size 480, n_window 50,
    n_window_infer 800, conv_chunksize 500, max_source_positions 1500, 28 decoder layers, 16 query / 8 kv heads,
    head_dim 128, rope_theta 1e6, rms_norm_eps 1e-6, interleaved MRoPE sections [24, 20, 20]. `overrides` are
    merged as in :func:`small_asr_config` (``audio=``, ``text=``, ``thinker=``, top-level fields).
    """
    if name not in _REAL_SIZES:
        raise ValueError(f"unknown released model {name!r}; expected one of {sorted(_REAL_SIZES)}")
    size = _REAL_SIZES[name]
    audio = _deep_merge(
        {**_SMALL_AUDIO, "downsample_hidden_size": 480, **size["audio"]}, overrides.pop("audio", None) or {}
    )
    text = _deep_merge(
        {
            **_SMALL_TEXT,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "rope_scaling": {
                "rope_type": "default",
                "mrope_section": [24, 20, 20],
                "interleaved": True,
                "mrope_interleaved": True,
            },
            **size["text"],
        },
        overrides.pop("text", None) or {},
    )
    return _assemble_config(
        audio,
        text,
        aligner=size["aligner"],
        classify_num=size.get("classify_num"),
        tie_word_embeddings=overrides.pop("tie_word_embeddings", None),
        thinker=overrides.pop("thinker", None),
        top=overrides,
    )


def is_aligner_config(config: dict[str, Any]) -> bool:
    """Whether a config.json dict describes a ForcedAligner (thinker model_type contains "forced_aligner")."""
    return "forced_aligner" in str(config.get("thinker_config", {}).get("model_type", ""))


def encoder_output_length(frames: int) -> int:
    """Encoder tokens for `frames` mel frames: 13 per full 100-frame chunk plus f(f(f(rest))), f(n) = (n-1)//2+1."""
    rest = frames % 100
    tail = 0 if rest == 0 else ((((rest - 1) // 2 + 1) - 1) // 2 + 1 - 1) // 2 + 1
    return 13 * (frames // 100) + tail


# --------------------------------------------------------------------------------------------------------------
# Weight scaling
# --------------------------------------------------------------------------------------------------------------

# Gains for `build_checkpoint(scale=True)`, matched on the parameter name's suffix ("@audio" / "@text" restricts
# a rule to the encoder / decoder). Each matrix of the official init (N(0, 0.02²)) is multiplied by
# gain / (0.02 · sqrt(fan_in)), so that afterwards its std is gain / sqrt(fan_in): a layer maps inputs of RMS r
# to outputs of RMS ≈ gain · r whatever the model size (for the small test configs, fan_in 64, a gain of 1 is a
# multiplier of 7.8; conv2d1's 0.5 is REFERENCE.md's "conv weights ×8"). The token embedding (and an untied
# vocabulary head) get std gain / sqrt(hidden_size), so logits have std ≈ gain. Biases and norm parameters,
# constant at the official init, are drawn at random (see `_scale_weights`).
#
# Measured effect (`measure_weight_effects`, seed 0, the espeak-ng clips of tests/support/speech.py; the
# window effect is on the ~19 s clip, 264 encoder tokens):
#
#   quantity                                   small_asr_config()         real_config("asr-0.6b"), 2+2 layers
#                                              official init   scaled     official init   scaled
#   conv front-end RMS / sinusoid RMS (0.71)   0.0002          1.05       0.011           1.12
#   encoder attention logit std                0.03            3.5        0.31            3.8
#   encoder mean max attention weight          0.0098          0.31       0.013           0.30   (uniform 0.0096)
#   windowed vs whole-clip encoder output      0.1%            35%        1.1%            29%    (relative)
#   decoder attention logit std                0.97            5.2        1.0             5.1
#   decoder mean max attention weight          0.23            0.71       0.23            0.75
#   tied head: argmax logit == input token     90%             0%         2%              0%
#
# At the official init the encoder sees positions only, attends uniformly, and windows hardly matter; the small
# tied model mostly echoes its input. Scaled, content and positions are comparable, attention is sharp but not
# one-hot, and the windows change the output by a third (`n_window_infer=200`: 50%).
WEIGHT_GAINS: dict[str, float] = {
    # audio encoder
    "audio_tower.conv2d1.weight": 0.5,
    "audio_tower.conv2d2.weight": 2.5,
    "audio_tower.conv2d3.weight": 2.5,
    "audio_tower.conv_out.weight": 3.5,
    "self_attn.q_proj.weight@audio": 2.0,
    "self_attn.k_proj.weight@audio": 2.0,
    "self_attn.v_proj.weight@audio": 1.5,
    "self_attn.out_proj.weight": 1.5,
    "fc1.weight": 1.5,
    "fc2.weight": 1.5,
    "audio_tower.proj1.weight": 1.5,
    "audio_tower.proj2.weight": 1.5,
    # decoder (q/k scale is undone by the per-head RMSNorm; their gains are the norm weights below)
    "self_attn.q_proj.weight@text": 1.0,
    "self_attn.k_proj.weight@text": 1.0,
    "self_attn.v_proj.weight@text": 1.5,
    "self_attn.o_proj.weight": 1.5,
    "mlp.gate_proj.weight": 1.5,
    "mlp.up_proj.weight": 1.5,
    "mlp.down_proj.weight": 1.5,
    "model.embed_tokens.weight": 4.0,
    "lm_head.weight": 4.0,
}
INIT_STD = 0.02

# Random values for the parameters the official init leaves constant.
BIAS_STD = 0.1
NORM_GAIN_SPREAD = 0.2
QK_NORM_GAIN_RANGE = (1.5, 3.0)


def _gain_rule(name: str) -> float | None:
    """The WEIGHT_GAINS entry for an original-layout parameter name (None when none applies)."""
    part = "audio" if ".audio_tower." in f".{name}" else "text"
    for suffix, gain in WEIGHT_GAINS.items():
        pattern, _, where = suffix.partition("@")
        if name.endswith(pattern) and (not where or where == part):
            return gain
    return None


def _scale_weights(model: Any, seed: int) -> None:
    """Scale the official model's freshly initialised parameters in place so that every part matters.

    Matrices follow :data:`WEIGHT_GAINS`; every bias becomes N(0, BIAS_STD²); LayerNorm / RMSNorm gains become
    1 + U(-0.2, 0.2) and LayerNorm biases N(0, BIAS_STD²); the decoder's per-head q/k RMSNorm gains become
    U(1.5, 3) (sharp attention). Tied parameters are visited once.
    """
    import torch

    gen = torch.Generator().manual_seed(seed + 7919)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                low, high = QK_NORM_GAIN_RANGE
                param.copy_(low + (high - low) * torch.rand(param.shape, generator=gen))
            elif name.endswith("norm.weight") or "layer_norm" in name or "ln_post" in name:
                if name.endswith(".bias"):
                    param.copy_(BIAS_STD * torch.randn(param.shape, generator=gen))
                else:
                    spread = NORM_GAIN_SPREAD * (2 * torch.rand(param.shape, generator=gen) - 1)
                    param.copy_(1.0 + spread)
            elif name.endswith(".bias"):
                param.copy_(BIAS_STD * torch.randn(param.shape, generator=gen))
            else:
                gain = _gain_rule(name)
                if gain is None:
                    continue
                if name.endswith(("embed_tokens.weight", "lm_head.weight")):
                    fan_in = param.shape[1]
                else:
                    fan_in = math.prod(param.shape[1:])
                param.mul_(gain / (INIT_STD * math.sqrt(fan_in)))


# --------------------------------------------------------------------------------------------------------------
# Key layouts
# --------------------------------------------------------------------------------------------------------------

# The transformers-native "-hf" layout (transformers 5's Qwen3ASRForConditionalGeneration /
# Qwen3ASRForTokenClassification). Source: huggingface/transformers,
# src/transformers/models/qwen3_asr/convert_qwen3_asr_to_hf.py (STATE_DICT_MAPPING_ASR /
# STATE_DICT_MAPPING_FORCED_ALIGNER), applied as ordered prefix replacements:
#   thinker.model.            -> model.language_model.
#   thinker.lm_head.          -> lm_head.           (ASR)   | score.   (ForcedAligner)
#   thinker.                  -> model.             (so thinker.audio_tower.* -> model.audio_tower.*)
#   model.audio_tower.proj1.  -> model.multi_modal_projector.linear_1.
#   model.audio_tower.proj2.  -> model.multi_modal_projector.linear_2.
# and modular_qwen3_asr.py there (Qwen3ASRMultiModalProjector: linear_1 d_model->d_model, GELU, linear_2
# d_model->output_dim; _tied_weights_keys {"lm_head.weight": "model.language_model.embed_tokens.weight"}).
# Everything under the audio tower keeps its name (conv2d1..3, conv_out, layers.N.*, ln_post).


def hf_key(original_key: str, *, aligner: bool) -> str:
    """The "-hf" layout name of an original-layout (``thinker.*``) tensor name."""
    head = "score." if aligner else "lm_head."
    rules = (
        ("thinker.model.", "model.language_model."),
        ("thinker.lm_head.", head),
        ("thinker.audio_tower.proj1.", "model.multi_modal_projector.linear_1."),
        ("thinker.audio_tower.proj2.", "model.multi_modal_projector.linear_2."),
        ("thinker.", "model."),
    )
    for old, new in rules:
        if original_key.startswith(old):
            return new + original_key[len(old) :]
    raise ValueError(f"not an original-layout tensor name: {original_key!r}")


# --------------------------------------------------------------------------------------------------------------
# Checkpoint directories
# --------------------------------------------------------------------------------------------------------------


def _official_config(config: dict[str, Any]) -> Any:
    """The official Qwen3ASRConfig for a config.json dict."""
    from qwen_asr.core.transformers_backend import Qwen3ASRConfig

    return Qwen3ASRConfig(**copy.deepcopy(config))


def build_official_model(config: dict[str, Any], *, seed: int = 0, scale: bool = True) -> Any:
    """The official ``Qwen3ASRForConditionalGeneration`` for `config` with seeded random weights, fp32, eval mode.

    The global torch RNG is left as it was. With `scale`, weights are scaled as :data:`WEIGHT_GAINS` describes.
    """
    import torch
    from qwen_asr.core.transformers_backend import Qwen3ASRForConditionalGeneration

    official_config = _official_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ASRForConditionalGeneration(official_config)
    model = model.to(torch.float32).eval()
    if scale:
        _scale_weights(model, seed)
    return model


def _tensors_to_save(
    model: Any, *, layout: str, dtype: str, aligner: bool, tied: bool, save_tied_head: bool
) -> dict[str, torch.Tensor]:
    """The model's tensors under the names and dtype of the checkpoint layout, each its own contiguous copy."""
    import torch

    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if tied and name == "thinker.lm_head.weight" and not save_tied_head:
            continue
        key = name if layout == "original" else hf_key(name, aligner=aligner)
        tensors[key] = tensor.detach().to(torch_dtype).clone().contiguous()
    return tensors


def _write_safetensors(dst: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int | None) -> list[str]:
    """Write `tensors` as model.safetensors, or as shards + model.safetensors.index.json; the file names."""
    from safetensors.torch import save_file

    metadata = {"format": "pt"}
    if max_shard_bytes is None:
        save_file(tensors, str(dst / "model.safetensors"), metadata=metadata)
        return ["model.safetensors"]
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for key in sorted(tensors):
        size = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][key] = tensors[key]
        shard_bytes += size
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    for shard_name, shard in zip(names, shards):
        save_file(shard, str(dst / shard_name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, shard_name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [*names, "model.safetensors.index.json"]


def _write_config_json(dst: Path, model: Any, config: dict[str, Any], dtype: str) -> None:
    """config.json as the official config's save_pretrained writes it, plus what that loses.

    ``Qwen3ASRThinkerConfig.to_dict`` writes its class model_type ("qwen3_asr_thinker") over an aligner's
    "qwen3_forced_aligner", which would turn the aligner's class head back into a vocabulary head on reload;
    the released aligner config carries it, so it is restored here.
    """
    import torch

    official_config = copy.deepcopy(model.config)
    official_config.architectures = ["Qwen3ASRForConditionalGeneration"]
    official_config.dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    official_config.save_pretrained(str(dst))
    path = dst / "config.json"
    written = json.loads(path.read_text(encoding="utf-8"))
    thinker_type = config.get("thinker_config", {}).get("model_type")
    if thinker_type and written["thinker_config"].get("model_type") != thinker_type:
        written["thinker_config"]["model_type"] = thinker_type
        path.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_generation_config(dst: Path) -> None:
    """generation_config.json: greedy, stop on <|im_end|> or <|endoftext|>."""
    from transformers import GenerationConfig

    GenerationConfig(
        eos_token_id=list(EOS_TOKEN_IDS), pad_token_id=PAD_TOKEN_ID, do_sample=False, max_new_tokens=512
    ).save_pretrained(str(dst))


def build_checkpoint(
    dst_dir: str | os.PathLike[str],
    config: dict[str, Any],
    *,
    seed: int = 0,
    layout: str = "original",
    scale: bool = True,
    dtype: str = "float32",
    max_shard_bytes: int | None = None,
    tokenizer: bool = True,
    save_tied_head: bool | None = None,
) -> str:
    """Write a complete checkpoint directory for `config` from the official model with seeded random weights.

    Args:
        dst_dir: directory to write (created; existing files of the same names are replaced).
        config: a config.json dict (e.g. :func:`small_asr_config`).
        seed: seeds the official init and the scaling; the same seed gives the same tensors in every layout,
            dtype and sharding.
        layout: ``"original"`` — the released ``thinker.*`` names, loadable by the official
            ``Qwen3ASRModel.from_pretrained`` / ``Qwen3ForcedAligner.from_pretrained``; ``"hf"`` — the
            transformers-native names (:func:`hf_key`). config.json is the released nested layout either way.
        scale: scale the weights so every part matters (:data:`WEIGHT_GAINS`); False keeps the official init.
        dtype: ``"float32"`` or ``"bfloat16"`` for the stored tensors (and config.json's ``dtype``).
        max_shard_bytes: None writes one ``model.safetensors``; otherwise shards of at most this many bytes
            (a bigger tensor gets a shard of its own) named ``model-0000i-of-0000n.safetensors`` plus
            ``model.safetensors.index.json``.
        tokenizer: also write vocab.json, merges.txt, tokenizer_config.json and chat_template.json
            (tests/support/vocab.py), which the official ``Qwen3ASRModel.from_pretrained`` needs; skip them to
            save a little time when only the model is loaded.
        save_tied_head: with a tied head, whether to store the head as its own tensor (a copy of the embedding).
            Default: yes in the original layout (Qwen's tied releases store ``thinker.lm_head.weight`` as a copy;
            loaders of the canonical checkpoints, e.g. m87-labs/kestrel, skip the duplicate), no in the "-hf"
            layout (transformers' save_pretrained drops tied copies, as the official save_pretrained here does
            too). The official loader accepts both.

    Returns:
        The directory, as a string. It always holds config.json, the weights, generation_config.json (eos
        [151645, 151643], greedy) and preprocessor_config.json.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    for stale in [*dst.glob("model*.safetensors"), dst / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)

    model = build_official_model(config, seed=seed, scale=scale)
    thinker = model.thinker
    tied = thinker.lm_head.weight is thinker.model.embed_tokens.weight
    if save_tied_head is None:
        save_tied_head = layout == "original"
    tensors = _tensors_to_save(
        model,
        layout=layout,
        dtype=dtype,
        aligner=is_aligner_config(config),
        tied=tied,
        save_tied_head=save_tied_head,
    )
    _write_safetensors(dst, tensors, max_shard_bytes)
    _write_config_json(dst, model, config, dtype)
    _write_generation_config(dst)
    from . import vocab

    vocab.write_preprocessor_config(dst)
    if tokenizer:
        vocab.write_tokenizer_files(dst, seed=seed)
    return str(dst)


def checkpoint_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every tensor stored in a checkpoint directory (single file or shards), by stored name and dtype."""
    from safetensors.torch import load_file

    root = Path(path)
    index = root / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(str(root / name)))
    return tensors


# --------------------------------------------------------------------------------------------------------------
# Running the official model
# --------------------------------------------------------------------------------------------------------------

_ORIGINAL_LAYER_FORWARD: Any = None
_WINDOW_FLAG = "_qasr_attention_windows"


def _layer_class() -> Any:
    from qwen_asr.core.transformers_backend.modeling_qwen3_asr import Qwen3ASRAudioEncoderLayer

    return Qwen3ASRAudioEncoderLayer


def _original_layer_forward() -> Any:
    """The unpatched ``Qwen3ASRAudioEncoderLayer.forward`` (captured before any patch is installed)."""
    global _ORIGINAL_LAYER_FORWARD
    if _ORIGINAL_LAYER_FORWARD is None:
        _ORIGINAL_LAYER_FORWARD = _layer_class().forward
    return _ORIGINAL_LAYER_FORWARD


def window_attention_mask(hidden_states: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The encoder's block-diagonal attention mask [1, 1, S, S] for ``cu_seqlens`` [W + 1].

    Built as ``Qwen3ASRAudioEncoder._prepare_attention_mask`` builds it for non-FlashAttention backends: 0 inside
    each window ``cu_seqlens[i-1]:cu_seqlens[i]``, the dtype's minimum elsewhere (added to the attention logits).
    """
    import torch

    seq_len = hidden_states.shape[0]
    mask = torch.full(
        (1, 1, seq_len, seq_len),
        torch.finfo(hidden_states.dtype).min,
        dtype=hidden_states.dtype,
        device=hidden_states.device,
    )
    bounds = [int(b) for b in cu_seqlens.tolist()]
    for start, end in itertools.pairwise(bounds):
        mask[..., start:end, start:end] = 0
    return mask


def _windowed_layer_forward(
    self: Any,
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    attention_mask: Any = None,
    **kwargs: Any,
) -> Any:
    """``Qwen3ASRAudioEncoderLayer.forward`` that passes the window mask when none is given and windows are on."""
    enabled = getattr(self, _WINDOW_FLAG, True)
    if attention_mask is None and enabled:
        attention_mask = window_attention_mask(hidden_states, cu_seqlens)
    return _original_layer_forward()(self, hidden_states, cu_seqlens, attention_mask=attention_mask, **kwargs)


@contextlib.contextmanager
def official_encoder_windows() -> Iterator[None]:
    """Within the block, every official audio encoder attends only inside its windows (CPU included).

    Patches ``Qwen3ASRAudioEncoderLayer.forward`` so that, when no attention mask is given, it passes the
    block-diagonal mask built from ``cu_seqlens`` (:func:`window_attention_mask`); restored on exit. A model's
    own per-instance setting (``load_official(windowed=True)``, or a runner's `windowed` argument while it runs)
    takes precedence.
    """
    cls = _layer_class()
    _original_layer_forward()  # capture the unpatched forward before patching
    previous = cls.forward
    cls.forward = _windowed_layer_forward
    try:
        yield
    finally:
        cls.forward = previous


def _encoder_layers(model: Any) -> list[Any]:
    thinker = getattr(model, "thinker", model)
    return list(thinker.audio_tower.layers)


def _set_windows(model: Any, enabled: bool) -> None:
    """Give every encoder layer of `model` an instance-level forward with windows on or off."""
    for layer in _encoder_layers(model):
        setattr(layer, _WINDOW_FLAG, bool(enabled))
        layer.forward = types.MethodType(_windowed_layer_forward, layer)


@contextlib.contextmanager
def _windows(model: Any, enabled: bool | None) -> Iterator[None]:
    """Temporarily set `model`'s encoder windows on/off (None: leave the model's own setting)."""
    if enabled is None:
        yield
        return
    layers = _encoder_layers(model)
    saved = [(layer.__dict__.get("forward"), layer.__dict__.get(_WINDOW_FLAG)) for layer in layers]
    _set_windows(model, enabled)
    try:
        yield
    finally:
        for layer, (forward, flag) in zip(layers, saved):
            for attr, value in (("forward", forward), (_WINDOW_FLAG, flag)):
                if value is None:
                    layer.__dict__.pop(attr, None)
                else:
                    layer.__dict__[attr] = value


def load_official(path: str | os.PathLike[str], *, windowed: bool = True) -> Any:
    """The official model loaded from a checkpoint dir with ``from_pretrained``, fp32, eval mode, CPU.

    Returns a ``Qwen3ASRForConditionalGeneration`` (the aligner too: its thinker has the class head). With
    `windowed` its encoder attends inside its windows (the served behaviour); ``windowed=False`` keeps the
    unpatched CPU behaviour (attention across the whole clip). Runners accept a per-call override.
    """
    import torch
    from qwen_asr.core.transformers_backend import Qwen3ASRForConditionalGeneration

    model = Qwen3ASRForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32)
    model = model.to(torch.float32).eval()
    if windowed:
        _set_windows(model, True)
    return model


def official_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """What the official loader makes of a checkpoint dir: its state dict (``thinker.*`` names) as fp32 numpy.

    A tied head appears under both ``thinker.model.embed_tokens.weight`` and ``thinker.lm_head.weight``.
    """
    import torch

    model = load_official(path, windowed=False)
    return {name: t.detach().to(torch.float32).numpy().copy() for name, t in model.state_dict().items()}


_FEATURE_EXTRACTORS: dict[str, Any] = {}


def _feature_extractor(preprocessor_dir: str | os.PathLike[str] | None) -> Any:
    """WhisperFeatureExtractor from a dir's preprocessor_config.json (default: the released settings)."""
    from transformers import WhisperFeatureExtractor

    if preprocessor_dir is None:
        key = "<released>"
        if key not in _FEATURE_EXTRACTORS:
            from . import vocab

            with tempfile.TemporaryDirectory() as tmp:
                vocab.write_preprocessor_config(tmp)
                _FEATURE_EXTRACTORS[key] = WhisperFeatureExtractor.from_pretrained(tmp)
        return _FEATURE_EXTRACTORS[key]
    key = str(Path(preprocessor_dir).resolve())
    if key not in _FEATURE_EXTRACTORS:
        _FEATURE_EXTRACTORS[key] = WhisperFeatureExtractor.from_pretrained(key)
    return _FEATURE_EXTRACTORS[key]


def official_features(
    wavs: Sequence[np.ndarray], preprocessor_dir: str | os.PathLike[str] | None = None
) -> list[tuple[np.ndarray, int]]:
    """Log-mel features of each 16 kHz waveform, as the official processor computes them for a batch of one.

    Calls the WhisperFeatureExtractor (from `preprocessor_dir`'s preprocessor_config.json, default the released
    settings) with the official processor's audio arguments: ``sampling_rate=16000, padding=True,
    truncation=False, return_attention_mask=True``.

    Returns:
        Per item ``(features, frames)``: float32 ``[128, T]`` and the number of valid frames (``T``).
    """
    extractor = _feature_extractor(preprocessor_dir)
    out: list[tuple[np.ndarray, int]] = []
    for wav in wavs:
        batch = extractor(
            [np.asarray(wav, dtype=np.float32)],
            sampling_rate=SAMPLE_RATE,
            padding=True,
            truncation=False,
            return_attention_mask=True,
            return_tensors="np",
        )
        frames = int(batch["attention_mask"][0].sum())
        out.append((np.ascontiguousarray(batch["input_features"][0, :, :frames], dtype=np.float32), frames))
    return out


def _features_only(features_list: Sequence[Any]) -> list[np.ndarray]:
    """Accept ``[features]`` or ``[(features, frames)]`` items; the [128, T] arrays, trimmed to `frames`."""
    arrays = []
    for item in features_list:
        if isinstance(item, tuple):
            feats, frames = item
            arrays.append(np.asarray(feats, dtype=np.float32)[:, :frames])
        else:
            arrays.append(np.asarray(item, dtype=np.float32))
    return arrays


def official_encode(
    model: Any, features_list: Sequence[Any], windowed: bool | None = True
) -> list[np.ndarray]:
    """The official audio encoder (with projector) run on each item alone.

    Args:
        model: from :func:`load_official` (or :func:`build_official_model`).
        features_list: per item ``[128, T_i]`` float32 features, or ``(features, frames)`` from
            :func:`official_features`.
        windowed: True — attention inside the windows; False — across the whole clip (the unpatched CPU
            behaviour); None — the model's own setting.

    Returns:
        Per item float32 ``[N_i, output_dim]``, ``N_i = encoder_output_length(T_i)``.
    """
    import torch

    outputs = []
    with _windows(model, windowed), torch.no_grad():
        tower = getattr(model, "thinker", model).audio_tower
        for feats in _features_only(features_list):
            hidden = tower(
                torch.from_numpy(feats), feature_lens=torch.tensor([feats.shape[1]])
            ).last_hidden_state
            outputs.append(hidden.to(torch.float32).numpy().copy())
    return outputs


def pad_features(features_list: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad features into one batch: ``(input_features [B, 128, T_max], feature_attention_mask [B, T_max])``."""
    arrays = _features_only(features_list)
    longest = max(a.shape[1] for a in arrays)
    batch = np.zeros((len(arrays), arrays[0].shape[0], longest), dtype=np.float32)
    mask = np.zeros((len(arrays), longest), dtype=np.int64)
    for i, feats in enumerate(arrays):
        batch[i, :, : feats.shape[1]] = feats
        mask[i, : feats.shape[1]] = 1
    return batch, mask


def official_logits(
    model: Any,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    features_list: Sequence[Any],
    windowed: bool | None = True,
) -> np.ndarray:
    """The official thinker forward: logits ``[B, S, V]`` (V = vocab, or classify_num for the aligner), fp32.

    Args:
        model: from :func:`load_official`.
        input_ids: int ``[B, S]``, left-padded, with one run of ``<|audio_pad|>`` per item whose length is that
            item's encoder output length (:func:`make_audio_prompt_ids`).
        attention_mask: int ``[B, S]``, 0 on the left padding.
        features_list: per item ``[128, T_i]`` features or ``(features, frames)``; padded into one batch with a
            ``feature_attention_mask`` as the official processor does.
        windowed: as in :func:`official_encode`.
    """
    import torch

    feats, feat_mask = pad_features(features_list)
    with _windows(model, windowed), torch.no_grad():
        thinker = getattr(model, "thinker", model)
        thinker.rope_deltas = None
        out = thinker(
            input_ids=torch.from_numpy(np.asarray(input_ids, dtype=np.int64)),
            attention_mask=torch.from_numpy(np.asarray(attention_mask, dtype=np.int64)),
            input_features=torch.from_numpy(feats),
            feature_attention_mask=torch.from_numpy(feat_mask),
            use_cache=False,
        )
    return out.logits.to(torch.float32).numpy()


def make_audio_prompt_ids(
    n_audio_tokens_list: Sequence[int],
    *,
    seed: int = 0,
    text_before: Sequence[int] | int = (3, 5),
    text_after: Sequence[int] | int = (2, 4),
    text_vocab: int = 3000,
    pad_id: int = PAD_TOKEN_ID,
) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts around audio: ``(input_ids [B, S], attention_mask [B, S])``, int64.

    Item i is ``<|im_start|>``, ``before_i`` random text tokens, ``<|audio_start|>``, ``<|audio_pad|>`` ×
    ``n_audio_tokens_list[i]``, ``<|audio_end|>``, ``after_i`` random text tokens, ``<|im_end|>``. Token counts
    before/after are drawn from the given inclusive ranges (or fixed ints) per item, so items differ in where
    their audio sits. Random text tokens come from ids ``[0, text_vocab)``. Padding (id `pad_id`, mask 0) is on
    the left, as the official processor pads.
    """
    rng = np.random.default_rng(seed)

    def count(spec: Sequence[int] | int) -> int:
        if isinstance(spec, int):
            return spec
        low, high = spec
        return int(rng.integers(low, high + 1))

    rows: list[list[int]] = []
    for n_audio in n_audio_tokens_list:
        before = rng.integers(0, text_vocab, size=count(text_before)).tolist()
        after = rng.integers(0, text_vocab, size=count(text_after)).tolist()
        rows.append(
            [
                IM_START_ID,
                *before,
                AUDIO_START_ID,
                *([AUDIO_PAD_ID] * int(n_audio)),
                AUDIO_END_ID,
                *after,
                IM_END_ID,
            ]
        )
    longest = max(len(r) for r in rows)
    input_ids = np.full((len(rows), longest), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(rows), longest), dtype=np.int64)
    for i, row in enumerate(rows):
        input_ids[i, longest - len(row) :] = row
        attention_mask[i, longest - len(row) :] = 1
    return input_ids, attention_mask


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    """``||a - b|| / ||b||`` (Frobenius norms over all elements)."""
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm((a - b).ravel()) / max(float(np.linalg.norm(b.ravel())), 1e-30))


def measure_weight_effects(model: Any, features_list: Sequence[Any]) -> dict[str, float]:
    """How much each part of a model matters on real features: the numbers behind :data:`WEIGHT_GAINS`.

    Runs the encoder on the longest item (windowed and across the whole clip) and the decoder on random text.

    Returns:
        ``conv_rms`` / ``position_rms``: RMS of the conv front end's output (``conv_out``, before positions are
        added) and of the 13 sinusoid rows added to it; ``encoder_logit_std`` and ``encoder_max_attention``:
        std of the encoder's attention logits and mean of each query's largest attention weight, inside the
        first window, averaged over layers (``uniform_attention`` is 1 / window tokens);
        ``window_effect``: relative difference between the windowed and whole-clip encoder outputs;
        ``decoder_logit_std`` / ``decoder_max_attention``: the same two attention statistics for the decoder
        (causal, before RoPE, GQA heads expanded); ``head_copies_input``: the fraction of positions whose argmax
        logit is the input token (a negligible decoder lets a tied head copy its input).
    """
    import torch

    thinker = getattr(model, "thinker", model)
    tower = thinker.audio_tower
    feats = max(_features_only(features_list), key=lambda a: a.shape[1])
    captured: dict[str, Any] = {"ln": []}
    hooks = [tower.conv_out.register_forward_hook(lambda m, i, o: captured.__setitem__("conv", o.detach()))]
    hooks += [
        layer.self_attn_layer_norm.register_forward_hook(lambda m, i, o: captured["ln"].append(o.detach()))
        for layer in tower.layers
    ]
    try:
        windowed = official_encode(model, [feats], windowed=True)[0]
    finally:
        for hook in hooks:
            hook.remove()
    whole = official_encode(model, [feats], windowed=False)[0]
    audio_cfg = tower.config
    window = 13 * (audio_cfg.n_window_infer // (2 * audio_cfg.n_window))
    enc_std, enc_max = [], []
    with torch.no_grad():
        for layer, normed in zip(tower.layers, captured["ln"]):
            attn = layer.self_attn
            x = normed[: min(window, normed.shape[0])]
            q = attn.q_proj(x).view(x.shape[0], attn.num_heads, -1).transpose(0, 1)
            k = attn.k_proj(x).view(x.shape[0], attn.num_heads, -1).transpose(0, 1)
            logits = (q @ k.transpose(1, 2)) * attn.scaling
            enc_std.append(float(logits.std()))
            enc_max.append(float(logits.softmax(-1).max(-1).values.mean()))

        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 3000, (1, 48), generator=gen)
        qk: list[torch.Tensor] = []
        hooks = []
        for layer in thinker.model.layers:
            hooks.append(layer.self_attn.q_norm.register_forward_hook(lambda m, i, o: qk.append(o.detach())))
            hooks.append(layer.self_attn.k_norm.register_forward_hook(lambda m, i, o: qk.append(o.detach())))
        try:
            logits_out = thinker(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        finally:
            for hook in hooks:
                hook.remove()
        dec_std, dec_max = [], []
        causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
        for q, k in zip(qk[0::2], qk[1::2]):
            k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
            scores = torch.einsum("bshd,bthd->bhst", q, k) / math.sqrt(q.shape[-1])
            dec_std.append(float(scores[..., causal].std()))
            dec_max.append(
                float(scores.masked_fill(~causal, float("-inf")).softmax(-1).max(-1).values.mean())
            )
        copies = float((logits_out.argmax(-1) == ids).float().mean()) if logits_out.shape[-1] > 3000 else 0.0
    return {
        "conv_rms": float(captured["conv"].pow(2).mean().sqrt()),
        "position_rms": float(tower.positional_embedding.positional_embedding[:13].pow(2).mean().sqrt()),
        "encoder_logit_std": float(np.mean(enc_std)),
        "encoder_max_attention": float(np.mean(enc_max)),
        "uniform_attention": 1.0 / min(window, windowed.shape[0]),
        "window_effect": relative_difference(windowed, whole),
        "decoder_logit_std": float(np.mean(dec_std)),
        "decoder_max_attention": float(np.mean(dec_max)),
        "head_copies_input": copies,
    }
