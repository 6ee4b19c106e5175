"""The untrained demo checkpoints the demo training configs start from: configs and a tokenizer of their own.

    python -m train.demo_init [--out train/configs] [--init-weights data/demo]

writes ``demo_asr_init/`` and ``demo_aligner_init/`` under --out (config.json, generation_config.json,
preprocessor_config.json and the tokenizer files, no weights; both are committed and rerunning reproduces them
byte for byte) and, with --init-weights DIR, the starting checkpoints ``DIR/asr_init`` and ``DIR/aligner_init``
(the same files plus seeded initial weights, see ``initial_params``) that the demo training configs load. With
``--aligner-from ASR_DIR`` the aligner starts from a trained demo ASR model instead (``aligner_params_from_asr``):
it then only has to learn to read times off an encoder and decoder that already follow the speech.

The tokenizer is a byte-level BPE in the Qwen2 layout trained on sentences of the synthetic corpus
(``train.synth``), so every word the grammar can produce is one or two tokens. Its regular vocabulary has
``REGULAR_VOCAB_SIZE`` entries (trained pieces, then unreachable filler) and the 63 added tokens of the released
Qwen3-ASR tokenizer follow in their released order, so the whole vocabulary is 2048 ids instead of 151936. The
ids of the special tokens therefore differ from the released ones (``<|im_end|>`` is 1987, not 151645); they are
written into config.json, generation_config.json and tokenizer_config.json consistently, and everything in
qasr_jax reads them from there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qasr_jax.config import AudioEncoderConfig, TextConfig, ThinkerConfig, config_to_dict
from qasr_jax.text import QWEN2_PRETOKENIZE_REGEX
from train.synth import LANGUAGES, SPLITS, sentence_split, sentence_text

# Trained pieces plus filler; the added tokens take the next 63 ids, so the vocabulary is 2048 ids.
REGULAR_VOCAB_SIZE = 1985
TOKENIZER_SENTENCES = 40000
TOKENIZER_SEED = 0

# The added tokens of the released tokenizer by offset from the end of the regular vocabulary (the released
# ids minus 151643), with their "special" flag. `<asr_text>` and `<timestamp>` are not special: the official
# pipeline decodes with skip_special_tokens=True and then looks for `<asr_text>`.
NAMED_ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (0, "<|endoftext|>", True),
    (1, "<|im_start|>", True),
    (2, "<|im_end|>", True),
    (3, "<|object_ref_start|>", True),
    (4, "<|object_ref_end|>", True),
    (5, "<|box_start|>", True),
    (6, "<|box_end|>", True),
    (7, "<|quad_start|>", True),
    (8, "<|quad_end|>", True),
    (9, "<|vision_start|>", True),
    (10, "<|vision_end|>", True),
    (11, "<|vision_pad|>", True),
    (12, "<|image_pad|>", True),
    (13, "<|video_pad|>", True),
    (14, "<tool_call>", False),
    (15, "</tool_call>", False),
    (16, "<|fim_prefix|>", False),
    (17, "<|fim_middle|>", False),
    (18, "<|fim_suffix|>", False),
    (19, "<|fim_pad|>", False),
    (20, "<|repo_name|>", False),
    (21, "<|file_sep|>", False),
    (22, "<tool_response>", False),
    (23, "</tool_response>", False),
    (24, "<think>", False),
    (25, "</think>", False),
    (26, "<|audio_start|>", True),
    (27, "<|audio_end|>", True),
    (28, "<tts_pad>", True),
    (29, "<tts_text_bos>", True),
    (30, "<tts_text_eod>", True),
    (31, "<tts_text_bos_single>", True),
    (33, "<|audio_pad|>", True),
    (61, "<asr_text>", False),
    (62, "<timestamp>", False),
)
ADDED_TOKEN_COUNT = 63
VOCAB_SIZE = REGULAR_VOCAB_SIZE + ADDED_TOKEN_COUNT

ADDITIONAL_SPECIAL_TOKENS = (
    "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
    "<|video_pad|>", "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>",
)  # fmt: skip
EXTRA_SPECIAL_TOKENS = {
    "audio_bos_token": "<|audio_start|>",
    "audio_eos_token": "<|audio_end|>",
    "audio_token": "<|audio_pad|>",
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
}
# The Qwen3-ASR chat template: system text, user turns whose content is a string or a list of
# {"type": "text" | "audio"} parts (an audio part becomes the audio slot), optional generation prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'audio' or 'audio' in part or 'audio_url' in part -%}"
    "{{- '<|audio_start|><|audio_pad|><|audio_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)
PREPROCESSOR_CONFIG = {
    "chunk_length": 30,
    "dither": 0.0,
    "feature_extractor_type": "WhisperFeatureExtractor",
    "feature_size": 128,
    "hop_length": 160,
    "n_fft": 400,
    "n_samples": 480000,
    "nb_max_frames": 3000,
    "padding_side": "right",
    "padding_value": 0.0,
    "processor_class": "Qwen3ASRProcessor",
    "return_attention_mask": True,
    "sampling_rate": 16000,
}


def added_token_id(content: str) -> int:
    """The id of a named added token in the demo vocabulary."""
    for offset, name, _ in NAMED_ADDED_TOKENS:
        if name == content:
            return REGULAR_VOCAB_SIZE + offset
    raise KeyError(content)


# The small models. The audio front end keeps the released mel, chunk and window settings (128 bins, 1 s chunks,
# 8 s attention windows) so features, chunking and windows are exercised exactly as with a released checkpoint,
# and words of continuous speech are not split between windows that never see each other. Training narrows the
# window to a batch shorter than 8 s (the same result), so short clips pay for no window padding.
AUDIO_CONFIG = AudioEncoderConfig(
    num_mel_bins=128,
    d_model=160,
    encoder_layers=3,
    encoder_attention_heads=4,
    encoder_ffn_dim=640,
    output_dim=192,
    n_window=50,
    n_window_infer=800,
    downsample_hidden_size=32,
    max_source_positions=1500,
    conv_chunksize=500,
)
TEXT_CONFIG = TextConfig(
    vocab_size=VOCAB_SIZE,
    hidden_size=192,
    intermediate_size=576,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=48,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    mrope_section=(8, 8, 8),
    mrope_interleaved=True,
    tie_word_embeddings=True,
)
# The released aligner's head: 5000 classes of 80 ms (400 s).
ALIGNER_CLASSES = 5000
TIMESTAMP_SEGMENT_MS = 80.0


def asr_config() -> ThinkerConfig:
    return ThinkerConfig(
        audio=AUDIO_CONFIG,
        text=TEXT_CONFIG,
        audio_token_id=added_token_id("<|audio_pad|>"),
        audio_start_token_id=added_token_id("<|audio_start|>"),
        audio_end_token_id=added_token_id("<|audio_end|>"),
    )


def aligner_config() -> ThinkerConfig:
    return asr_config().replace(
        text=dataclasses.replace(TEXT_CONFIG, tie_word_embeddings=False),
        is_aligner=True,
        classify_num=ALIGNER_CLASSES,
        timestamp_token_id=added_token_id("<timestamp>"),
        timestamp_segment_time=TIMESTAMP_SEGMENT_MS,
    )


# --------------------------------------------------------------------------------------------------------------
# Initial weights

INIT_SEED = 0
CONV_OUT_GAIN = 10.0
PROJECTOR_GAIN = 1.4


def initial_params(config: ThinkerConfig, seed: int = INIT_SEED) -> Any:
    """The model's own seeded random init, with the audio path rescaled so that its output follows the audio.

    At the default init (normal, std 0.02) the three stacked convolutions shrink the log-mel input so much that
    the encoder output hardly depends on the audio (it is the sinusoidal positions), and a model trained from
    there settles into outputs that ignore the audio. So:

    * the convolutions get He scale (std sqrt(2 / fan_in));
    * ``conv_out`` gets std ``CONV_OUT_GAIN`` / sqrt(fan_in): the log-mel input has a standard deviation of about
      0.28, and the gain brings the audio features to about three times the positions' size;
    * the projector (``proj1``, ``proj2``) gets std ``PROJECTOR_GAIN`` / sqrt(fan_in) instead of 0.02, so its
      output is not its biases alone: with 0.02 the biases, which Adam moves as fast as any weight, soon
      dominate every frame and the RMS-normalised CTC logits become the same at every frame.

    """
    import flax
    import jax
    import jax.numpy as jnp

    from qasr_jax.model import Qwen3ASR

    ids = jnp.zeros((1, 4), jnp.int32)
    frames = config.audio.chunk_frames
    features = jnp.zeros((1, config.audio.num_mel_bins, frames), jnp.float32)
    variables = Qwen3ASR(config).init(
        jax.random.PRNGKey(seed), ids, jnp.ones_like(ids), features, jnp.ones((1, frames), jnp.int32)
    )
    params = flax.core.meta.unbox(variables["params"])
    tower = params["audio_tower"]
    frontend = tower["frontend"]
    channels = config.audio.downsample_hidden_size
    fan_in = {"conv2d1": 9, "conv2d2": 9 * channels, "conv2d3": 9 * channels}
    for name, fan in fan_in.items():
        kernel = frontend[name]["kernel"]
        frontend[name]["kernel"] = kernel * (np.sqrt(2.0 / fan) / float(jnp.std(kernel)))
    conv_out = frontend["conv_out"]["kernel"]
    frontend["conv_out"]["kernel"] = conv_out * (
        CONV_OUT_GAIN / np.sqrt(conv_out.shape[0]) / float(jnp.std(conv_out))
    )
    for name in ("proj1", "proj2"):
        kernel = tower[name]["kernel"]
        tower[name]["kernel"] = kernel * (PROJECTOR_GAIN / np.sqrt(kernel.shape[0]) / float(jnp.std(kernel)))
    return params


def aligner_params_from_asr(asr_dir: str | Path, seed: int = INIT_SEED) -> Any:
    """Aligner weights that start from a trained demo ASR model: its encoder, embeddings and decoder, and a fresh
    class head (the ASR model's head is its tied embedding)."""
    import jax.numpy as jnp

    from qasr_jax.weights import load_pretrained

    asr_config_loaded, asr_params = load_pretrained(asr_dir, dtype=jnp.float32)
    config = aligner_config()
    if (
        asr_config_loaded.audio != config.audio
        or asr_config_loaded.text.hidden_size != config.text.hidden_size
    ):
        raise ValueError(f"{asr_dir}: not a demo ASR checkpoint of this shape")
    params = initial_params(config, seed)
    params.update({name: value for name, value in asr_params.items() if name != "lm_head"})
    return params


def write_initial_checkpoint(dst: Path, source: Path, config: ThinkerConfig, params: Any = None) -> None:
    """``source``'s files plus ``params`` (default ``initial_params``) in float32, as a released-layout dir."""
    from qasr_jax.weights import export_pretrained

    params = initial_params(config) if params is None else params
    export_pretrained(dst, config, params, source_dir=source, dtype="float32")


# --------------------------------------------------------------------------------------------------------------
# Tokenizer


def tokenizer_corpus(count: int = TOKENIZER_SENTENCES, seed: int = TOKENIZER_SEED) -> list[str]:
    """Training-split sentences of every language, and the language tags the model writes."""
    rng = np.random.default_rng([seed, len(SPLITS)])
    corpus = []
    names = list(LANGUAGES)
    while len(corpus) < count:
        language = names[len(corpus) % len(names)]
        text = sentence_text(LANGUAGES[language].sentence(rng))
        if sentence_split(language, text) == "train":
            corpus.append(text)
    corpus += [f"language {name}" for name in names] * 100
    return corpus


def train_bpe(corpus: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE (Qwen2 pre-tokenizer) of at most REGULAR_VOCAB_SIZE pieces: (vocab, merges)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=REGULAR_VOCAB_SIZE,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def write_tokenizer_files(dst: Path, vocab: dict[str, int], merges: Sequence[tuple[str, str]]) -> None:
    """vocab.json, merges.txt, tokenizer_config.json and chat_template.json in the released layout."""
    ordered = sorted(vocab.items(), key=lambda item: item[1])
    if [token_id for _, token_id in ordered] != list(range(len(ordered))) or len(
        ordered
    ) > REGULAR_VOCAB_SIZE:
        raise AssertionError(
            "trained vocabulary ids must be contiguous from 0 and fit the regular vocabulary"
        )
    # transformers gives added tokens the next free ids in order, so the regular vocabulary must fill every id
    # below them. Filler pieces contain a character run the byte-level alphabet never produces and no merge
    # builds, so no input encodes to them.
    full_vocab = dict(ordered)
    for token_id in range(len(ordered), REGULAR_VOCAB_SIZE):
        full_vocab[f"ĊĊĊ<unused_{token_id}>"] = token_id
    (dst / "vocab.json").write_text(json.dumps(full_vocab, ensure_ascii=False), encoding="utf-8")
    (dst / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges), encoding="utf-8"
    )
    named = {offset: (content, special) for offset, content, special in NAMED_ADDED_TOKENS}
    added = {
        REGULAR_VOCAB_SIZE + offset: named.get(offset, (f"<|reserved_special_token_{offset}|>", True))
        for offset in range(ADDED_TOKEN_COUNT)
    }
    tokenizer_config: dict[str, Any] = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(token_id): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": special,
            }
            for token_id, (content, special) in added.items()
        },
        "additional_special_tokens": list(ADDITIONAL_SPECIAL_TOKENS),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "extra_special_tokens": dict(EXTRA_SPECIAL_TOKENS),
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "processor_class": "Qwen3ASRProcessor",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
        **EXTRA_SPECIAL_TOKENS,
    }
    (dst / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    (dst / "chat_template.json").write_text(
        json.dumps({"chat_template": CHAT_TEMPLATE}, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )


def write_checkpoint_dir(
    dst: Path, config: ThinkerConfig, vocab: dict[str, int], merges: Sequence[tuple[str, str]]
) -> None:
    """A weightless checkpoint dir: config.json, generation_config.json, preprocessor and tokenizer files."""
    dst.mkdir(parents=True, exist_ok=True)

    def write_json(name: str, value: Any) -> None:
        (dst / name).write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")

    write_json("config.json", config_to_dict(config))
    end_ids = [added_token_id("<|im_end|>"), added_token_id("<|endoftext|>")]
    write_json(
        "generation_config.json",
        {"do_sample": False, "eos_token_id": end_ids, "pad_token_id": added_token_id("<|endoftext|>")},
    )
    write_json("preprocessor_config.json", PREPROCESSOR_CONFIG)
    write_tokenizer_files(dst, vocab, merges)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.demo_init",
        description="Write the untrained demo ASR and aligner checkpoint dirs (configs and tokenizer).",
    )
    parser.add_argument("--out", default="train/configs", help="parent directory (default train/configs)")
    parser.add_argument("--init-weights", metavar="DIR",
                        help="also write the starting checkpoints DIR/asr_init and DIR/aligner_init")  # fmt: skip
    parser.add_argument("--aligner-from", metavar="ASR_DIR",
                        help="start the aligner from this trained demo ASR checkpoint (with --init-weights)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.aligner_from and not args.init_weights:
        parser.error("--aligner-from needs --init-weights DIR")
    vocab, merges = train_bpe(tokenizer_corpus())
    out = Path(args.out)
    for kind, config in (("asr", asr_config()), ("aligner", aligner_config())):
        weightless = out / f"demo_{kind}_init"
        write_checkpoint_dir(weightless, config, vocab, merges)
        print(f"{weightless}: {len(vocab)} trained pieces, vocabulary {VOCAB_SIZE}", file=sys.stderr)
        if args.init_weights:
            start = Path(args.init_weights) / f"{kind}_init"
            if kind == "aligner" and args.aligner_from:
                write_initial_checkpoint(
                    start, weightless, config, aligner_params_from_asr(args.aligner_from)
                )
                print(f"{start}: weights of {args.aligner_from}, new class head", file=sys.stderr)
            else:
                write_initial_checkpoint(start, weightless, config)
                print(f"{start}: initial weights (seed {INIT_SEED})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
