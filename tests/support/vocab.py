"""A small, complete Qwen3-ASR tokenizer and processor config for tests, in the released file layout.

`write_tokenizer_files` trains a byte-level BPE with HF `tokenizers` on a built-in multilingual corpus and writes
`vocab.json`, `merges.txt`, `tokenizer_config.json` and `chat_template.json` the way the released checkpoints
ship them (no `tokenizer.json`: transformers converts the slow files itself). The special tokens sit at the
released ids; the vocabulary between the trained tokens and id 151643 is padded with unreachable filler pieces
because transformers gives added tokens the next free ids in order, so the ids only come out right when the
regular vocabulary has exactly 151643 entries. `write_preprocessor_config` adds the WhisperFeatureExtractor
settings, after which the official `Qwen3ASRProcessor.from_pretrained(dir)` accepts the directory.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# The regular vocabulary of every released Qwen2/Qwen3 tokenizer ends here; added tokens follow.
REGULAR_VOCAB_SIZE = 151643
TRAINED_VOCAB_SIZE = 3000

# Qwen2 pre-tokenizer: contractions, letter runs with one leading non-letter, single digits, punctuation runs,
# newlines, whitespace.
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

# (id, content, special) for the added tokens of the released Qwen3-ASR tokenizer. `<asr_text>` and `<timestamp>`
# are not special: the official pipeline decodes with skip_special_tokens=True and then looks for `<asr_text>`.
NAMED_ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
    (151665, "<tool_response>", False),
    (151666, "</tool_response>", False),
    (151667, "<think>", False),
    (151668, "</think>", False),
    (151669, "<|audio_start|>", True),
    (151670, "<|audio_end|>", True),
    (151671, "<tts_pad>", True),
    (151672, "<tts_text_bos>", True),
    (151673, "<tts_text_eod>", True),
    (151674, "<tts_text_bos_single>", True),
    (151676, "<|audio_pad|>", True),
    (151704, "<asr_text>", False),
    (151705, "<timestamp>", False),
)
LAST_ADDED_ID = 151705

# The model-specific special tokens the official processor reads as tokenizer attributes.
EXTRA_SPECIAL_TOKENS = {
    "audio_bos_token": "<|audio_start|>",
    "audio_eos_token": "<|audio_end|>",
    "audio_token": "<|audio_pad|>",
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
}

# Renders the Qwen3-ASR prompt: system text, user turns whose content is a string or a list of
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

# Text in the scripts the tests exercise, so that merges exist for each and multi-byte characters get merged
# into (and split across) tokens.
CORPUS_LINES: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog. It's what we've all heard; they'll say I'd do it.",
    "Speech recognition turns audio into text: hello world, good morning, thank you very much!",
    "Numbers like 2024, 3.14 and 1,000,000 are read one digit at a time.",
    "language English<asr_text>so we went to the market and bought some apples",
    "language Chinese<asr_text>今天天气很好，我们去公园散步吧。",
    "语音识别把声音变成文字。我们的模型支持三十种语言和二十二种方言。",
    "中华人民共和国 北京 上海 广州 深圳 你好 谢谢 再见",
    "今日はいい天気ですね。日本語の音声認識をテストしています。カタカナとひらがな。",
    "東京都 大阪 ありがとうございます すみません",
    "안녕하세요. 오늘 날씨가 정말 좋네요. 한국어 음성 인식 시험입니다.",
    "감사합니다 서울 부산 대한민국",
    "مرحبا بكم في اختبار التعرف على الكلام باللغة العربية.",
    "شكرا جزيلا السلام عليكم",
    "สวัสดีครับ วันนี้อากาศดีมาก ภาษาไทยไม่มีช่องว่างระหว่างคำ",
    "नमस्ते, आज मौसम बहुत अच्छा है। हिंदी भाषण पहचान परीक्षण।",
    "धन्यवाद भारत दिल्ली",
    "Guten Morgen! Die Straße ist schön, und die Bäume blühen. Grüße aus München.",
    "Ça va très bien, merci. Où est la bibliothèque? El niño comió pan. Olá, tudo bem?",
    "Привет, как дела? Спасибо большое. Γειά σου κόσμε.",
    "Emoji: 😀 😂 👍 🎉 ❤️ 👨‍👩‍👧‍👦 🇯🇵 🙏🏽",
    "Mixed 中文 and English, 日本語 and 한국어, 😀 in between.",
    "   leading spaces, trailing spaces   \n\nnew lines\r\nand\ttabs",
)


def _corpus(seed: int) -> list[str]:
    """The built-in lines repeated with seeded shuffles and recombinations, so merge counts are not all ties."""
    rng = random.Random(seed)
    lines = list(CORPUS_LINES)
    corpus = []
    for _ in range(8):
        rng.shuffle(lines)
        corpus.extend(lines)
        words = " ".join(lines).split()
        for _ in range(20):
            corpus.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))))
    return corpus


def _train_bpe(seed: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
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
        vocab_size=TRAINED_VOCAB_SIZE,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(seed), trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def _added_token_entries() -> dict[int, tuple[str, bool]]:
    """Every id 151643..151705: the named tokens, and reserved specials where the release has unnamed ones."""
    entries = {token_id: (content, special) for token_id, content, special in NAMED_ADDED_TOKENS}
    for token_id in range(REGULAR_VOCAB_SIZE, LAST_ADDED_ID + 1):
        entries.setdefault(token_id, (f"<|reserved_special_token_{token_id - REGULAR_VOCAB_SIZE}|>", True))
    return dict(sorted(entries.items()))


def write_tokenizer_files(dst_dir: str | Path, *, seed: int = 0) -> None:
    """Write vocab.json, merges.txt, tokenizer_config.json and chat_template.json into `dst_dir`."""
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    vocab, merges = _train_bpe(seed)
    ordered = sorted(vocab.items(), key=lambda item: item[1])
    if [token_id for _, token_id in ordered] != list(range(len(ordered))):
        raise AssertionError("trained vocabulary ids are not contiguous from 0")
    # Filler pieces contain a character the byte-level alphabet never produces as a run, and no merge builds them,
    # so no input can ever encode to them.
    full_vocab = dict(ordered)
    for token_id in range(len(ordered), REGULAR_VOCAB_SIZE):
        full_vocab[f"ĊĊĊ<unused_{token_id}>"] = token_id
    (dst / "vocab.json").write_text(json.dumps(full_vocab, ensure_ascii=False), encoding="utf-8")
    (dst / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges), encoding="utf-8"
    )

    added = _added_token_entries()
    tokenizer_config = {
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
        "additional_special_tokens": [
            "<|im_start|>",
            "<|im_end|>",
            "<|object_ref_start|>",
            "<|object_ref_end|>",
            "<|box_start|>",
            "<|box_end|>",
            "<|quad_start|>",
            "<|quad_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|vision_pad|>",
            "<|image_pad|>",
            "<|video_pad|>",
            "<|audio_start|>",
            "<|audio_end|>",
            "<|audio_pad|>",
        ],
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
        json.dumps(tokenizer_config, ensure_ascii=False, indent=2), encoding="utf-8"
    )
    (dst / "chat_template.json").write_text(
        json.dumps({"chat_template": CHAT_TEMPLATE}, ensure_ascii=False, indent=2), encoding="utf-8"
    )


def write_preprocessor_config(dst_dir: str | Path) -> None:
    """Write the released WhisperFeatureExtractor settings (128 mel bins, 16 kHz, hop 160, n_fft 400)."""
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    config = {
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
    (dst / "preprocessor_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
