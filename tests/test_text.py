"""qasr_jax.text against its oracles: transformers' Qwen2TokenizerFast and the official qwen-asr functions."""

from __future__ import annotations

import itertools
import json
import random
import shutil
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import qwen_asr.inference.utils as qwen_utils
import transformers

from qasr_jax import text
from qasr_jax.errors import LanguageError, MissingExtraError, PromptError, TokenizerError
from tests.support.vocab import write_preprocessor_config, write_tokenizer_files

RELEASED_IDS = {
    "endoftext_id": 151643,
    "im_start_id": 151644,
    "im_end_id": 151645,
    "audio_start_id": 151669,
    "audio_end_id": 151670,
    "audio_pad_id": 151676,
    "asr_text_id": 151704,
    "timestamp_id": 151705,
}

RELEASED_TOKENS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|audio_start|>": 151669,
    "<|audio_end|>": 151670,
    "<|audio_pad|>": 151676,
    "<asr_text>": 151704,
    "<timestamp>": 151705,
}

MULTILINGUAL_TEXTS = [
    "Hello world! It's a test; we've done it, they'll see.",
    "   leading and trailing spaces   ",
    "lines\n\nand\r\nbreaks\tand tabs  \n ",
    "Numbers 1234567 and 3.14159, 1,000,000.",
    "今天天气很好，我们去公园散步吧。",
    "语音识别把声音变成文字",
    "今日はいい天気ですね。カタカナとひらがな。",
    "안녕하세요. 오늘 날씨가 정말 좋네요.",
    "مرحبا بكم في اختبار التعرف على الكلام",
    "สวัสดีครับ วันนี้อากาศดีมาก",
    "नमस्ते, आज मौसम बहुत अच्छा है।",
    "Grüße aus München, die Straße ist schön.",
    "Emoji 😀😂👍🎉 ❤️ 👨‍👩‍👧‍👦 🇯🇵 🙏🏽",
    "𠀀𠀁 𪚥 rare ideographs outside the BMP",
    "Mixed 中文 and English, 日本語 and 한국어, 😀 in between.",
    "<|im_start|>system\nhi<|im_end|>\n<|audio_start|><|audio_pad|><|audio_end|>",
    "language English<asr_text>hello<timestamp><timestamp>world",
    "<|endoftext|><|endoftext|> x <|im_end|>",
    "<|im_start <|im_end| <asr_text <timestamp",
    "<|reserved_special_token_3|> and <think> and </tool_call>",
    "",
    " ",
]


def _nfd(s: str) -> str:
    return unicodedata.normalize("NFD", s)


def _random_texts(count: int, seed: int) -> list[str]:
    """Random strings over letters of many scripts, digits, punctuation, whitespace, combining marks, emoji,
    and pieces of special tokens."""
    rng = random.Random(seed)
    alphabets = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789",
        " \t\n\r  ",
        ".,;:!?'\"()[]{}<>|/\\-_=+*&^%$#@~`",
        "今天天气很好语音识别中文字",
        "ひらがなカタカナ日本語",
        "안녕하세요한국어",
        "مرحبابكم",
        "สวัสดีครับภาษาไทย",
        "नमस्तेहिंदी",
        "äöüßéèçñ",
        "\u0301\u0308\u0327",
        "😀😂👍🎉❤️🙏🏽\u200d",
        "𠀀𠀁𪚥",
    ]
    fragments = [
        "<|im_end|>",
        "<|audio_pad|>",
        "<asr_text>",
        "<timestamp>",
        "<|im_start|>",
        "'s",
        "'ll",
        "language ",
    ]
    texts = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(0, 12)):
            if rng.random() < 0.1:
                parts.append(rng.choice(fragments))
            else:
                alphabet = rng.choice(alphabets)
                parts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))))
        texts.append("".join(parts))
    return texts


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer_files(directory)
    write_preprocessor_config(directory)
    return directory


@pytest.fixture(scope="module")
def reference_tokenizer(model_dir):
    return transformers.AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def tokenizer(model_dir) -> text.Tokenizer:
    return text.Tokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def official_processor(model_dir):
    from qwen_asr.core.transformers_backend import Qwen3ASRProcessor

    return Qwen3ASRProcessor.from_pretrained(str(model_dir), fix_mistral_regex=True)


# ------------------------------------------------------------------------------------------------------------
# Test vocabulary


def test_test_vocabulary_loads_in_transformers_with_released_ids(model_dir, reference_tokenizer):
    assert type(reference_tokenizer).__name__ == "Qwen2TokenizerFast"
    for content, token_id in RELEASED_TOKENS.items():
        assert reference_tokenizer.convert_tokens_to_ids(content) == token_id, content
        assert reference_tokenizer.encode(content) == [token_id], content
    assert reference_tokenizer.eos_token_id == 151645
    assert reference_tokenizer.pad_token_id == 151643
    assert reference_tokenizer.audio_token == "<|audio_pad|>"
    assert len(reference_tokenizer) == 151706


def test_test_vocabulary_is_deterministic_and_seeded(tmp_path):
    write_tokenizer_files(tmp_path / "a")
    write_tokenizer_files(tmp_path / "b")
    write_tokenizer_files(tmp_path / "c", seed=1)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "chat_template.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "merges.txt").read_bytes() != (tmp_path / "c" / "merges.txt").read_bytes()


def test_official_auto_processor_accepts_the_test_directory(model_dir):
    from qwen_asr.core.transformers_backend import Qwen3ASRConfig, Qwen3ASRProcessor

    transformers.AutoProcessor.register(Qwen3ASRConfig, Qwen3ASRProcessor, exist_ok=True)
    processor = transformers.AutoProcessor.from_pretrained(str(model_dir), fix_mistral_regex=True)
    assert type(processor).__name__ == "Qwen3ASRProcessor"
    assert processor.feature_extractor.feature_size == 128
    assert processor.feature_extractor.sampling_rate == 16000


# ------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_special_token_ids_are_read_from_the_files(tokenizer):
    for name, token_id in RELEASED_IDS.items():
        assert getattr(tokenizer, name) == token_id, name
    assert len(tokenizer) == 151706


@pytest.mark.parametrize("sample", MULTILINGUAL_TEXTS + [_nfd(t) for t in MULTILINGUAL_TEXTS])
def test_encode_matches_transformers_on_multilingual_text(tokenizer, reference_tokenizer, sample):
    assert tokenizer.encode(sample) == reference_tokenizer.encode(sample)


def test_encode_and_decode_match_transformers_on_random_text(tokenizer, reference_tokenizer):
    samples = _random_texts(300, seed=0)
    samples += [_nfd(s) for s in samples[:100]] + [unicodedata.normalize("NFKC", s) for s in samples[:50]]
    for sample in samples:
        ids = tokenizer.encode(sample)
        assert ids == reference_tokenizer.encode(sample), repr(sample)
        for skip in (False, True):
            assert tokenizer.decode(ids, skip_special_tokens=skip) == reference_tokenizer.decode(
                ids, skip_special_tokens=skip
            ), repr(sample)


def test_nfc_and_nfd_input_encode_alike(tokenizer):
    # The Qwen2 normaliser is NFC, so decomposed input gives the composed tokens.
    composed = "Grüße, café, 한국어"
    assert tokenizer.encode(_nfd(composed)) == tokenizer.encode(composed)


def test_decode_of_multibyte_characters_split_across_tokens_matches_transformers(
    tokenizer, reference_tokenizer
):
    samples = ["😀👍🎉", "𠀀𪚥", "今天天气", "한국어", "नमस्ते", "สวัสดี"]
    split_seen = 0
    for sample in samples:
        ids = tokenizer.encode(sample)
        pieces = [tokenizer.decode([i]) for i in ids]
        split_seen += sum("\ufffd" in piece for piece in pieces)
        for start in range(len(ids)):
            for end in range(start, len(ids) + 1):
                assert tokenizer.decode(ids[start:end]) == reference_tokenizer.decode(ids[start:end])
    assert split_seen > 0, "the test vocabulary must split some character across tokens"


def test_decode_matches_transformers_on_random_ids(tokenizer, reference_tokenizer):
    rng = random.Random(1)
    special_ids = sorted(tokenizer.added_tokens)
    for _ in range(300):
        ids = [
            rng.choice(special_ids)
            if rng.random() < 0.15
            else rng.randrange(0, 3000 if rng.random() < 0.9 else 151936)
            for _ in range(rng.randint(0, 30))
        ]
        for skip in (False, True):
            assert tokenizer.decode(ids, skip_special_tokens=skip) == reference_tokenizer.decode(
                ids, skip_special_tokens=skip
            ), ids


def test_skip_special_tokens_keeps_asr_text_and_timestamp(tokenizer, reference_tokenizer):
    ids = tokenizer.encode(
        "<|im_start|>assistant\nlanguage English<asr_text>hi<timestamp><|im_end|><|endoftext|>"
    )
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded == "assistant\nlanguage English<asr_text>hi<timestamp>"
    assert decoded == reference_tokenizer.decode(ids, skip_special_tokens=True)


def test_encode_without_special_tokens_treats_them_as_text(tokenizer, reference_tokenizer, model_dir):
    from tokenizers import Tokenizer as BackendTokenizer

    splitting = transformers.AutoTokenizer.from_pretrained(str(model_dir), split_special_tokens=True)
    state = json.loads(reference_tokenizer.backend_tokenizer.to_str())
    state["added_tokens"] = []
    no_added_tokens = BackendTokenizer.from_str(json.dumps(state))
    non_special = [t.content for t in reference_tokenizer.added_tokens_decoder.values() if not t.special]
    assert "<asr_text>" in non_special
    for sample in MULTILINGUAL_TEXTS + _random_texts(100, seed=2):
        ids = tokenizer.encode(sample, allow_special=False)
        assert ids == no_added_tokens.encode(sample).ids
        assert not set(ids) & set(tokenizer.added_tokens)
        if not any(token in sample for token in non_special):
            # transformers' split_special_tokens covers tokens flagged special only.
            assert ids == splitting.encode(sample)


def test_tokenizer_json_directory_gives_the_same_ids(tmp_path, reference_tokenizer, tokenizer):
    reference_tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    (tmp_path / "vocab.json").unlink()
    (tmp_path / "merges.txt").unlink()
    from_json = text.Tokenizer.from_pretrained(tmp_path)
    for sample in MULTILINGUAL_TEXTS:
        assert from_json.encode(sample) == tokenizer.encode(sample)
    assert from_json.audio_pad_id == 151676


REGEX_SENSITIVE_TEXTS = [
    "HelloWorld iPhone McDonald's",
    "नमस्ते हिंदी",
    "สวัสดีครับ",
    "a/b/\nc",
    "don't WE'LL",
    "مَرْحَبًا",
]


@pytest.mark.parametrize(
    ("version", "official_swaps_regex"),
    [
        (None, True),
        ("4.57.1", False),
        ("4.57.2.dev0", False),
        ("4.57.3", True),
        ("4.57.6", True),
        ("5.0.0rc1", True),
        ("5.0.0", False),
    ],
)
def test_pretokenizer_follows_the_official_loader_for_each_config_version(
    tmp_path, model_dir, version, official_swaps_regex
):
    from qwen_asr.core.transformers_backend import Qwen3ASRProcessor

    directory = tmp_path / "checkpoint"
    shutil.copytree(model_dir, directory)
    config = {"model_type": "qwen3_asr"}
    if version is not None:
        config["transformers_version"] = version
    (directory / "config.json").write_text(json.dumps(config))
    official = Qwen3ASRProcessor.from_pretrained(str(directory), fix_mistral_regex=True).tokenizer
    ours = text.Tokenizer.from_pretrained(directory)
    plain = text.Tokenizer.from_pretrained(directory, follow_official_loader=False)
    reference_pre = official.backend_tokenizer.pre_tokenizer
    swapped = False
    for sample in REGEX_SENSITIVE_TEXTS:
        assert ours.encode(sample) == official.encode(sample)
        assert ours._backend.pre_tokenizer.pre_tokenize_str(sample) == reference_pre.pre_tokenize_str(sample)
        swapped |= plain._backend.pre_tokenizer.pre_tokenize_str(sample) != reference_pre.pre_tokenize_str(
            sample
        )
    assert swapped == official_swaps_regex


def test_missing_or_broken_files_raise_tokenizer_error_naming_the_file(tmp_path, model_dir):
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        directory = tmp_path / name.replace(".", "_")
        shutil.copytree(model_dir, directory)
        (directory / name).unlink()
        with pytest.raises(TokenizerError, match=name.replace(".", r"\.")):
            text.Tokenizer.from_pretrained(directory)
    with pytest.raises(TokenizerError, match="not a directory"):
        text.Tokenizer.from_pretrained(tmp_path / "nowhere")

    directory = tmp_path / "no_timestamp"
    shutil.copytree(model_dir, directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"]["151705"]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = text.Tokenizer.from_pretrained(directory)
    assert loaded.asr_text_id == 151704
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json.*<timestamp>"):
        _ = loaded.timestamp_id

    directory = tmp_path / "gap"
    shutil.copytree(model_dir, directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"]["151650"]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="declared at id"):
        text.Tokenizer.from_pretrained(directory)


# ------------------------------------------------------------------------------------------------------------
# Languages and prompts


def test_normalize_language_matches_official():
    rng = random.Random(3)
    names = [
        *qwen_utils.SUPPORTED_LANGUAGES,
        "cHINese",
        "  english ",
        "JAPANESE",
        "klingon",
        "Chinese,English",
    ]
    names += ["".join(rng.choice(n) for _ in range(3)) + n.swapcase() for n in qwen_utils.SUPPORTED_LANGUAGES]
    names += [n.swapcase() for n in qwen_utils.SUPPORTED_LANGUAGES] + [f"\t{n.upper()}\n" for n in names[:30]]
    assert tuple(qwen_utils.SUPPORTED_LANGUAGES) == text.SUPPORTED_LANGUAGES
    for name in names:
        try:
            expected = qwen_utils.normalize_language_name(name)
            qwen_utils.validate_language(expected)
        except ValueError:
            with pytest.raises(LanguageError, match="Macedonian"):
                text.normalize_language(name)
        else:
            assert text.normalize_language(name) == expected
    for blank in ("", "   ", None):
        with pytest.raises(LanguageError):
            text.normalize_language(blank)


def _official_asr_model(processor):
    from qwen_asr.inference.qwen3_asr import Qwen3ASRModel

    model = object.__new__(Qwen3ASRModel)
    model.processor = processor
    return model


PROMPT_CONTEXTS = [
    "",
    "Names: Qwen, Alibaba, JAX.",
    "术语：语音识别，大模型。",
    "multi\nline\n\ncontext  ",
    "context with <|im_end|> and <asr_text> inside",
    "😀 emoji context 한국어",
]


@pytest.mark.parametrize("language", [None, "", "english", "CHINESE", " Japanese "])
def test_prompt_ids_match_official_processor(tokenizer, official_processor, language):
    official = _official_asr_model(official_processor)
    forced = (
        None if language is None or not language.strip() else qwen_utils.normalize_language_name(language)
    )
    for context, seconds in zip(PROMPT_CONTEXTS, (0.5, 1.0, 2.37, 3.3, 0.61, 9.99)):
        prompt = official._build_text_prompt(context=context, force_language=forced)
        assert text.build_prompt_text(context, language) == prompt
        wav = np.zeros(int(seconds * 16000), dtype=np.float32)
        inputs = official_processor(text=[prompt], audio=[wav], return_tensors="np", padding=True)
        expected = inputs["input_ids"][0].tolist()
        audio_tokens = expected.count(151676)
        frames = int(inputs["feature_attention_mask"][0].sum())
        assert (
            audio_tokens == 13 * (frames // 100) + (((frames % 100 - 1) // 2 + 1 - 1) // 2 + 1 - 1) // 2 + 1
        )
        assert text.build_prompt_ids(tokenizer, audio_tokens, context, language) == expected


def test_prompt_rejects_unsupported_language_and_extra_audio_slot(tokenizer):
    with pytest.raises(LanguageError, match="Cantonese"):
        text.build_prompt_ids(tokenizer, 5, "", "Klingon")
    with pytest.raises(PromptError, match="exactly one"):
        text.build_prompt_ids(tokenizer, 5, "a <|audio_pad|> in the context")
    assert text.build_prompt_ids(tokenizer, 0).count(151676) == 0


# ------------------------------------------------------------------------------------------------------------
# Output parsing and repair


def _repetition_cases(seed: int) -> list[str]:
    rng = random.Random(seed)
    cases = ["", "a", "a" * 19, "a" * 20, "a" * 21, "a" * 40, "ab" * 20, "ab" * 19 + "a", "哈" * 100]
    cases += ["x" + "abc" * 25 + "y" + "d" * 30 + "ef" * 21, "ab" * 10 + "a" * 25 + "b" * 20]
    for _ in range(300):
        parts = []
        for _ in range(rng.randint(1, 5)):
            kind = rng.random()
            if kind < 0.5:
                unit = "".join(rng.choice("ab 的了呀,.😀") for _ in range(rng.randint(1, 23)))
                parts.append(unit * rng.randint(1, 45))
            else:
                parts.append("".join(rng.choice("abcdefg 今天天气很好") for _ in range(rng.randint(0, 50))))
        cases.append("".join(parts))
    return cases


def test_repetition_repair_matches_official():
    for case in _repetition_cases(seed=4):
        assert text.repair_repetitions(case) == qwen_utils.detect_and_fix_repetitions(case), repr(case)


def _asr_output_cases(seed: int) -> list[str | None]:
    rng = random.Random(seed)
    cases: list[str | None] = [
        None,
        "",
        "   ",
        "language English<asr_text>Hello world.",
        "language Chinese<asr_text>今天天气很好。",
        "language None<asr_text>",
        "language None<asr_text>  something anyway ",
        "LANGUAGE none <asr_text>x",
        "language cHINese<asr_text>text<asr_text>more",
        "language \n<asr_text>x",
        "just text without a tag",
        "prefix\nlanguage Japanese\n<asr_text>こんにちは",
        "noise\n\n  language   Korean  \nlanguage English<asr_text>안녕",
        "language<asr_text>x",
        "<asr_text>only text",
        "language English<asr_text>" + "ha" * 30,
        "language English" + "a" * 50 + "<asr_text>b",
        "languages English<asr_text>x",
        " language English <asr_text> spaced ",
    ]
    pieces = [
        "language ",
        "English",
        "None",
        "none",
        "<asr_text>",
        "\n",
        " ",
        "\r\n",
        "\u2028",
        "chinese",
        "x",
        "文字",
    ]
    pieces += ["ab" * 12, "哈" * 22, "LANGUAGE ", "İ", "😀"]
    for _ in range(400):
        cases.append("".join(rng.choice(pieces) for _ in range(rng.randint(0, 10))))
    return cases


def test_parse_asr_output_matches_official():
    for raw in _asr_output_cases(seed=5):
        for forced in (None, "", "English", "Chinese"):
            assert text.parse_asr_output(raw, forced) == qwen_utils.parse_asr_output(raw, forced), (
                raw,
                forced,
            )


def test_merge_languages_matches_official():
    rng = random.Random(6)
    choices = ["Chinese", "English", "", " ", None, " English ", "Japanese"]
    for _ in range(300):
        langs = [rng.choice(choices) for _ in range(rng.randint(0, 8))]
        assert text.merge_languages(langs) == qwen_utils.merge_languages(langs), langs


# ------------------------------------------------------------------------------------------------------------
# Aligner text preparation


@pytest.fixture(scope="module")
def official_aligner_text():
    from qwen_asr.inference.qwen3_forced_aligner import Qwen3ForceAlignProcessor

    return Qwen3ForceAlignProcessor()


@pytest.fixture(scope="module")
def official_korean_dictionary() -> Path:
    import qwen_asr.inference.qwen3_forced_aligner as aligner_module

    return Path(aligner_module.__file__).parent / "assets" / "korean_dict_jieba.dict"


ALIGNER_TEXTS = {
    "English": ["Hello, world! It's 3 o'clock.", "don't   stop -- believing...", "", "  ,.! ", "a-b c_d e'f"],
    "Chinese": [
        "今天天气很好，我们去公园散步吧。",
        "我用iPhone15拍了3张照片",
        "中文English混合123",
        "𠀀𪚥㐀豈",
    ],
    "German": ["Grüße aus München, die Straße ist schön.", "Café naïve coöperate"],
    "Arabic": ["مرحبا بكم في اختبار التعرف على الكلام"],
    "Hindi": ["नमस्ते, आज मौसम बहुत अच्छा है।"],
    "Thai": ["สวัสดีครับ วันนี้อากาศดีมาก"],
    "Japanese": ["今日はいい天気ですね。", "東京タワーに行きました！", "iPhoneを買った"],
    "Korean": ["안녕하세요. 오늘 날씨가 정말 좋네요.", "대한민국 서울특별시에 삽니다", "감사합니다!"],
    "cantonese": ["你好呀，今日好熱"],
}


def test_split_words_and_aligner_text_match_official(official_aligner_text, official_korean_dictionary):
    cases = [(language, t) for language, texts in ALIGNER_TEXTS.items() for t in texts]
    cases += [("English", t) for t in _random_texts(200, seed=7)]
    cases += [("Chinese", t) for t in _random_texts(100, seed=8)]
    cases += [("Japanese", t) for t in _random_texts(20, seed=9)]
    cases += [("Korean", t) for t in _random_texts(40, seed=10)]
    for language, sample in cases:
        expected_words, expected_text = official_aligner_text.encode_timestamp(sample, language)
        words = text.split_words(sample, language, korean_dictionary=official_korean_dictionary)
        assert words == expected_words, (language, sample)
        assert text.build_aligner_text(words) == expected_text


def test_aligner_ids_match_official_processor(tokenizer, official_processor, official_aligner_text):
    for language, sample in [
        ("English", "Hello, world! It's 3 o'clock."),
        ("Chinese", "今天天气很好"),
        ("English", ""),
    ]:
        words, aligner_text = official_aligner_text.encode_timestamp(sample, language)
        wav = np.zeros(int(2.5 * 16000), dtype=np.float32)
        inputs = official_processor(text=[aligner_text], audio=[wav], return_tensors="np", padding=True)
        expected = inputs["input_ids"][0].tolist()
        ids = text.build_aligner_ids(tokenizer, words, expected.count(151676))
        assert ids == expected
        assert ids.count(tokenizer.timestamp_id) == 2 * max(len(words), 1)


def test_missing_segmenters_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "nagisa", None)
    with pytest.raises(ImportError, match=r"qasr-jax\[ja\]"):
        text.split_words("今日は", "Japanese")
    monkeypatch.setitem(sys.modules, "soynlp", None)
    monkeypatch.setitem(sys.modules, "soynlp.tokenizer", None)
    monkeypatch.setattr(text, "_korean_segmenters", {})
    with pytest.raises(ImportError, match=r"qasr-jax\[ko\]"):
        text.split_words("안녕하세요", "korean")


def test_missing_korean_dictionary_is_named(tmp_path):
    with pytest.raises(MissingExtraError, match=r"nothing\.dict"):
        text.split_words("안녕하세요", "Korean", korean_dictionary=tmp_path / "nothing.dict")


def test_default_korean_dictionary_is_found_from_the_environment_or_the_official_package(
    tmp_path, monkeypatch, official_korean_dictionary
):
    monkeypatch.delenv(text.KOREAN_DICTIONARY_ENV, raising=False)
    assert text.default_korean_dictionary().resolve() == official_korean_dictionary.resolve()
    monkeypatch.setenv(text.KOREAN_DICTIONARY_ENV, str(tmp_path / "mine.dict"))
    assert text.default_korean_dictionary() == tmp_path / "mine.dict"


def _timestamp_cases(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    cases = [
        np.array([0, 0]),
        np.array([5, 4]),
        np.array([3, 2, 1]),
        np.array([9, 1, 2, 3]),
        np.array([1, 2, 3, 0]),
        np.array([1, 5, 5, 5, 2, 2]),
        np.array([0, 10, 1, 2, 3, 20, 4, 30]),
        np.array([10, 20, 0, 0, 0, 0, 30, 40]),
        np.array([50, 40, 30, 20, 10, 0]),
        np.array([1, 1, 1, 1]),
        np.array([3, 1, 2, 0, 5, 4, 7, 6]),
    ]
    for _ in range(400):
        n = int(rng.integers(2, 60))
        kind = rng.integers(0, 4)
        if kind == 0:
            values = rng.integers(0, 50, n)
        elif kind == 1:
            values = np.sort(rng.integers(0, 5000, n))
            outliers = rng.integers(0, n, int(rng.integers(1, max(2, n // 3))))
            values[outliers] = rng.integers(0, 5000, len(outliers))
        elif kind == 2:
            values = np.sort(rng.integers(0, 300, n))
            start = int(rng.integers(0, n))
            values[start : start + int(rng.integers(1, 8))] = int(rng.integers(0, 300))
        else:
            values = np.sort(rng.integers(0, 100, n))[::-1].copy()
        cases.append(values)
    # The official pipeline passes class ids times the 80 ms segment as float32.
    cases += [(c * 80.0).astype(np.float32) for c in cases[:150]]
    return cases


def test_repair_timestamps_matches_official(official_aligner_text):
    for values in _timestamp_cases(seed=11):
        expected = official_aligner_text.fix_timestamp(values)
        assert text.repair_timestamps(values.tolist()) == expected, values.tolist()


def test_repair_timestamps_is_monotonic_and_fast():
    rng = np.random.default_rng(12)
    values = np.sort(rng.integers(0, 100000, 4000)).tolist()
    for i in rng.integers(0, 4000, 300):
        values[int(i)] = int(rng.integers(0, 100000))
    repaired = text.repair_timestamps(values)
    assert all(a <= b for a, b in itertools.pairwise(repaired))
    assert text.repair_timestamps([]) == []
