"""Text side of Qwen3-ASR: tokenizer, prompts, output parsing and repair, and aligner text preparation.

Everything here reproduces the official pipeline (qwen-asr 0.0.6 with transformers' Qwen2TokenizerFast) token for
token and character for character; only HF `tokenizers` is needed at runtime. The Japanese and Korean word
segmenters of the aligner are optional extras (`qasr-jax[ja]`, `qasr-jax[ko]`).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from functools import cache, cached_property
from pathlib import Path
from typing import Any

from qasr_jax.errors import LanguageError, MissingExtraError, PromptError, TokenizerError

SUPPORTED_LANGUAGES: tuple[str, ...] = (
    "Chinese",
    "English",
    "Cantonese",
    "Arabic",
    "German",
    "French",
    "Spanish",
    "Portuguese",
    "Indonesian",
    "Italian",
    "Korean",
    "Russian",
    "Thai",
    "Vietnamese",
    "Japanese",
    "Turkish",
    "Hindi",
    "Malay",
    "Dutch",
    "Swedish",
    "Danish",
    "Finnish",
    "Polish",
    "Czech",
    "Filipino",
    "Persian",
    "Greek",
    "Romanian",
    "Hungarian",
    "Macedonian",
)

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
AUDIO_START = "<|audio_start|>"
AUDIO_END = "<|audio_end|>"
AUDIO_PAD = "<|audio_pad|>"
ASR_TEXT = "<asr_text>"
TIMESTAMP = "<timestamp>"

# The pre-tokenizer of Qwen2 tokenizers as transformers builds it from vocab.json + merges.txt.
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

# The regex transformers 4.57 substitutes when a tokenizer is loaded with fix_mistral_regex=True (see
# Tokenizer.from_pretrained): letter runs split at lower->upper case changes and include combining marks.
MISTRAL_FIX_PRETOKENIZE_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_MISTRAL_MODEL_TYPES = ("mistral", "mistral3", "voxtral", "ministral", "pixtral")

_LANGUAGE_PREFIX = "language "


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerError(f"{path}: tokenizer file is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TokenizerError(f"{path}: not valid JSON ({err})") from None


def _read_merges(path: Path) -> list[tuple[str, str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise TokenizerError(f"{path}: tokenizer file is missing") from None
    merges = []
    for line_number, line in enumerate(lines, start=1):
        line = line.strip()
        # The first line may be a "#version: ..." header; blank lines carry nothing.
        if not line or (line_number == 1 and line.startswith("#version:")):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerError(f"{path}:{line_number}: a merge must be two pieces, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _version_key(version: str) -> tuple[int, ...]:
    """A comparable key close enough to PEP 440 for release, pre/dev (below the release) and post versions."""
    match = re.match(r"\s*v?(\d+)(?:\.(\d+))?(?:\.(\d+))?(.*)", version)
    if match is None:
        return ()
    major, minor, patch, rest = match.groups()
    rest = rest.lower()
    stage = 1 if "post" in rest else (-1 if any(tag in rest for tag in ("dev", "a", "b", "rc")) else 0)
    return (int(major), int(minor or 0), int(patch or 0), stage)


def _official_loader_swaps_regex(config_path: Path) -> bool:
    """Whether transformers 4.57 with fix_mistral_regex=True would replace the pre-tokenizer regex here."""
    if not config_path.is_file():
        return False
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    if not isinstance(config, dict):
        return False
    version = config.get("transformers_version")
    model_type = config.get("model_type")
    if version:
        key = _version_key(str(version))
        if key <= (4, 57, 2, 0):
            return model_type is None or model_type in _MISTRAL_MODEL_TYPES
        if key >= (5, 0, 0, 0):
            return False
    return True


_SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


def _token_content(value: Any) -> str | None:
    if isinstance(value, str):
        return value or None
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"] or None
    return None


def _special_token_names(config: dict[str, Any]) -> set[str]:
    """Tokens transformers treats as special whatever their own flag: the named ones (eos, pad, ...), the
    additional special tokens and the model-specific extra special tokens (audio_token, ...)."""
    values: list[Any] = [config.get(key) for key in _SPECIAL_TOKEN_KEYS]
    values.extend(config.get("additional_special_tokens") or [])
    extra = config.get("extra_special_tokens") or {}
    values.extend(extra.values() if isinstance(extra, dict) else extra)
    return {name for value in values if (name := _token_content(value)) is not None}


def _clean_up_tokenization(text: str) -> str:
    """transformers' English detokenisation clean-up, applied only when the tokenizer config asks for it."""
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text


class Tokenizer:
    """Byte-level BPE with the Qwen2 pre-tokenizer and the added tokens of `tokenizer_config.json`.

    Gives the same ids and strings as transformers' Qwen2TokenizerFast loaded from the same directory.
    """

    def __init__(
        self,
        backend: Any,
        plain_backend: Any,
        added_tokens: dict[int, str],
        clean_up_tokenization_spaces: bool,
        config_path: Path,
    ) -> None:
        self._backend = backend
        # The same pipeline without added tokens: encodes special-token strings as ordinary text.
        self._plain_backend = plain_backend
        self._added_tokens = dict(added_tokens)
        self._added_ids = {content: token_id for token_id, content in added_tokens.items()}
        self._clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self._config_path = config_path

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, *, follow_official_loader: bool = True) -> Tokenizer:
        """Load `vocab.json`, `merges.txt` and `tokenizer_config.json` from a checkpoint directory.

        A `tokenizer.json`, when present, is what transformers loads instead of vocab.json + merges.txt, so it is
        preferred here too; the added tokens of `tokenizer_config.json` are applied on top in both cases.

        The official pipeline loads its processor with `fix_mistral_regex=True`; transformers 4.57 then swaps the
        Qwen2 pre-tokenizer regex for a Mistral one whenever the directory's `config.json` lacks
        `transformers_version` or names a version in (4.57.2, 5.0.0). With `follow_official_loader` (the default)
        the same rule applies here, so ids match the official pipeline on the same directory; without it the
        tokenizer files alone decide, as in a plain `AutoTokenizer.from_pretrained`.
        """
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as BackendTokenizer

        directory = Path(model_dir)
        if not directory.is_dir():
            raise TokenizerError(f"{directory}: not a directory")
        config_path = directory / "tokenizer_config.json"
        config = _read_json(config_path)
        if not isinstance(config, dict):
            raise TokenizerError(f"{config_path}: expected a JSON object")

        tokenizer_json = directory / "tokenizer.json"
        if tokenizer_json.is_file():
            try:
                backend = BackendTokenizer.from_file(str(tokenizer_json))
            except Exception as err:
                raise TokenizerError(f"{tokenizer_json}: cannot be loaded ({err})") from None
            plain = json.loads(backend.to_str())
            plain["added_tokens"] = []
            plain_backend = BackendTokenizer.from_str(json.dumps(plain))
        else:
            backend = cls._build_bpe(directory)
            plain_backend = cls._build_bpe(directory)
        if follow_official_loader and _official_loader_swaps_regex(directory / "config.json"):
            from tokenizers import Regex, pre_tokenizers

            for target in (backend, plain_backend):
                target.pre_tokenizer[0] = pre_tokenizers.Split(
                    Regex(MISTRAL_FIX_PRETOKENIZE_REGEX), behavior="isolated", invert=False
                )

        added_tokens_decoder = config.get("added_tokens_decoder", {})
        if not isinstance(added_tokens_decoder, dict):
            raise TokenizerError(f"{config_path}: added_tokens_decoder must be an object of id -> token")
        entries: dict[int, dict[str, Any]] = {}
        for key, entry in added_tokens_decoder.items():
            try:
                token_id = int(key)
                content = entry["content"] if isinstance(entry, dict) else str(entry)
            except (ValueError, KeyError, TypeError):
                raise TokenizerError(
                    f"{config_path}: bad added_tokens_decoder entry {key!r}: {entry!r}"
                ) from None
            entries[token_id] = entry if isinstance(entry, dict) else {"content": content}

        # transformers adds the tokens in id order, each taking the next free id, and marks a token special when
        # the config names it as a special token anywhere; then it appends named special tokens that are missing.
        # Check that the ids land where the config says rather than silently renumbering.
        special_names = _special_token_names(config)
        present = {token.content for token in backend.get_added_tokens_decoder().values()}
        for token_id in sorted(entries):
            entry = entries[token_id]
            if entry["content"] in present:
                continue
            special = bool(entry.get("special", False)) or entry["content"] in special_names
            backend.add_tokens(
                [
                    AddedToken(
                        entry["content"],
                        single_word=bool(entry.get("single_word", False)),
                        lstrip=bool(entry.get("lstrip", False)),
                        rstrip=bool(entry.get("rstrip", False)),
                        normalized=bool(entry.get("normalized", not special)),
                        special=special,
                    )
                ]
            )
            present.add(entry["content"])
        for name in sorted(special_names - present):
            if backend.token_to_id(name) is None:
                backend.add_tokens([AddedToken(name, special=True, normalized=False)])
        added_tokens: dict[int, str] = {}
        for token_id, entry in sorted(entries.items()):
            actual = backend.token_to_id(entry["content"])
            if actual != token_id:
                raise TokenizerError(
                    f"{config_path}: added token {entry['content']!r} is declared at id {token_id} but lands at "
                    f"id {actual}; the regular vocabulary must fill every id below the added tokens"
                )
            added_tokens[token_id] = entry["content"]
        for token_id, token in backend.get_added_tokens_decoder().items():
            added_tokens.setdefault(token_id, token.content)

        return cls(
            backend,
            plain_backend,
            added_tokens,
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            config_path=config_path,
        )

    @staticmethod
    def _build_bpe(directory: Path) -> Any:
        from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors
        from tokenizers import Tokenizer as BackendTokenizer

        vocab_path = directory / "vocab.json"
        vocab = _read_json(vocab_path)
        if not isinstance(vocab, dict):
            raise TokenizerError(f"{vocab_path}: expected a JSON object of piece -> id")
        merges = _read_merges(directory / "merges.txt")
        try:
            model = models.BPE(
                vocab=vocab,
                merges=merges,
                dropout=None,
                unk_token=None,
                continuing_subword_prefix="",
                end_of_word_suffix="",
                fuse_unk=False,
                byte_fallback=False,
            )
        except Exception as err:
            raise TokenizerError(f"{vocab_path}, merges.txt: inconsistent BPE files ({err})") from None
        backend = BackendTokenizer(model)
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        return backend

    def with_merges(self, count: int) -> Tokenizer:
        """This tokenizer with only its first ``count`` BPE merges. Words split into smaller pieces, each of them
        a piece of this vocabulary (the result of an earlier merge, or a byte), so every id keeps its meaning:
        finer units for a CTC objective whose labels must be shared between words."""
        from tokenizers import Tokenizer as BackendTokenizer

        spec = json.loads(self._plain_backend.to_str())
        if spec.get("model", {}).get("type") != "BPE":
            raise TokenizerError(f"{self._config_path}: with_merges needs a BPE tokenizer")
        spec["model"]["merges"] = spec["model"]["merges"][: max(int(count), 0)]
        plain = BackendTokenizer.from_str(json.dumps(spec))
        return Tokenizer(
            plain, plain, self._added_tokens, self._clean_up_tokenization_spaces, self._config_path
        )

    # -- encoding and decoding --

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """Token ids of `text`; no BOS/EOS is added (Qwen tokenizers add none).

        With `allow_special=False`, added-token strings such as "<|im_end|>" in `text` are encoded as ordinary
        text instead of becoming their token.
        """
        backend = self._backend if allow_special else self._plain_backend
        return list(backend.encode(text, add_special_tokens=True).ids)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """The text of `ids`. Incomplete UTF-8 sequences become U+FFFD; ids outside the vocabulary are dropped.

        `skip_special_tokens` drops tokens marked special (`<|im_end|>`, `<|audio_pad|>`, ...) but keeps the
        non-special added tokens `<asr_text>` and `<timestamp>`, as transformers does.
        """
        text = self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self._clean_up_tokenization_spaces:
            text = _clean_up_tokenization(text)
        return text

    def decode_with_spans(
        self, ids: Iterable[int], *, skip_special_tokens: bool = False
    ) -> tuple[str, list[tuple[int, int]]]:
        """``decode(ids)`` and, per id, the characters of that text it produced: ``(start, end)``, end exclusive.

        A character whose UTF-8 bytes come from several ids belongs to each of them; an id that produces no text
        (a skipped special token) gets an empty span where it stands. The spans come from each id's bytes (the
        byte-level BPE pieces); a tokenizer whose pieces do not reassemble to its ``decode`` (another decoder, a
        clean-up rule) is measured by decoding every prefix of ``ids`` instead.
        """
        ids = [int(i) for i in ids]
        text = self.decode(ids, skip_special_tokens=skip_special_tokens)
        pieces = [self._token_bytes(i, skip_special_tokens) for i in ids]
        if all(piece is not None for piece in pieces):
            decoded, spans = _char_spans_of_bytes(pieces)  # type: ignore[arg-type]
            if decoded == text:
                return text, spans
        return text, self._spans_by_prefixes(ids, skip_special_tokens, text)

    def _token_bytes(self, token_id: int, skip_special_tokens: bool) -> bytes | None:
        """The bytes one id contributes to a decoded text (as the byte-level decoder maps its piece), or None for
        an id outside the vocabulary."""
        if skip_special_tokens and token_id in self._special_ids:
            return b""
        piece = self._backend.id_to_token(token_id)
        if piece is None:
            return None
        table = _byte_decoder()
        if all(char in table for char in piece):
            return bytes(table[char] for char in piece)
        return piece.encode("utf-8")

    @cached_property
    def _special_ids(self) -> frozenset[int]:
        return frozenset(i for i, token in self._backend.get_added_tokens_decoder().items() if token.special)

    def _spans_by_prefixes(
        self, ids: list[int], skip_special_tokens: bool, text: str
    ) -> list[tuple[int, int]]:
        """Spans measured by decoding each prefix ``ids[:k + 1]``: id k owns the characters of ``text`` it settles
        (that now agree with ``text``), and the character after them when its prefix ends inside one (decodes
        past the agreeing part)."""
        spans: list[tuple[int, int]] = []
        settled = 0
        waiting: list[int] = []  # ids that reach into the character at ``settled``
        for k, token_id in enumerate(ids):
            spans.append((settled, settled))
            if skip_special_tokens and token_id in self._special_ids:
                continue  # produces no text
            decoded = self.decode(ids[: k + 1], skip_special_tokens=skip_special_tokens)
            agree = _common_prefix_length(decoded, text)
            if agree > settled:
                for j in waiting:
                    spans[j] = (spans[j][0], settled + 1)
                spans[k] = (settled, agree)
                waiting, settled = [], agree
            if len(decoded) > agree:
                waiting.append(k)
        for j in waiting:
            spans[j] = (spans[j][0], min(settled + 1, len(text)))
        return spans

    def token_to_id(self, token: str) -> int | None:
        """The id of one vocabulary piece or added token, or None."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    def __len__(self) -> int:
        """Number of ids in use: regular vocabulary plus added tokens (the model's embedding may be larger)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def added_tokens(self) -> dict[int, str]:
        return dict(self._added_tokens)

    def _added_token_id(self, content: str) -> int:
        token_id = self._added_ids.get(content)
        if token_id is None:
            raise TokenizerError(f"{self._config_path}: added_tokens_decoder has no {content!r} token")
        return token_id

    @cached_property
    def endoftext_id(self) -> int:
        return self._added_token_id(ENDOFTEXT)

    @cached_property
    def im_start_id(self) -> int:
        return self._added_token_id(IM_START)

    @cached_property
    def im_end_id(self) -> int:
        return self._added_token_id(IM_END)

    @cached_property
    def audio_start_id(self) -> int:
        return self._added_token_id(AUDIO_START)

    @cached_property
    def audio_end_id(self) -> int:
        return self._added_token_id(AUDIO_END)

    @cached_property
    def audio_pad_id(self) -> int:
        return self._added_token_id(AUDIO_PAD)

    @cached_property
    def asr_text_id(self) -> int:
        return self._added_token_id(ASR_TEXT)

    @cached_property
    def timestamp_id(self) -> int:
        return self._added_token_id(TIMESTAMP)


@cache
def _byte_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's ``bytes_to_unicode``) back to bytes: printable bytes stand for
    themselves, the others for the characters from U+0100 on, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


# Byte ranges each continuation byte must fall in, per lead byte (Unicode's well-formed UTF-8 table).
_ANY = (0x80, 0xBF)
_CONTINUATIONS = {
    **{b: (_ANY,) for b in range(0xC2, 0xE0)},
    0xE0: ((0xA0, 0xBF), _ANY),
    **{b: (_ANY, _ANY) for b in (*range(0xE1, 0xED), 0xEE, 0xEF)},
    0xED: ((0x80, 0x9F), _ANY),
    0xF0: ((0x90, 0xBF), _ANY, _ANY),
    **{b: (_ANY, _ANY, _ANY) for b in range(0xF1, 0xF4)},
    0xF4: ((0x80, 0x8F), _ANY, _ANY),
}


def _utf8_characters(data: bytes) -> list[int]:
    """The character of ``data.decode("utf-8", errors="replace")`` each byte falls in: a well-formed sequence is
    one character, and so is each maximal ill-formed subpart (one U+FFFD), as the decoder replaces them."""
    owners: list[int] = []
    i = character = 0
    while i < len(data):
        length = 1
        for low, high in _CONTINUATIONS.get(data[i], ()):
            if i + length < len(data) and low <= data[i + length] <= high:
                length += 1
            else:
                break
        owners.extend([character] * length)
        character += 1
        i += length
    return owners


def _char_spans_of_bytes(pieces: Sequence[bytes]) -> tuple[str, list[tuple[int, int]]]:
    """The UTF-8 text of the concatenated ``pieces`` (ill-formed bytes as U+FFFD) and the characters each piece's
    bytes fall in."""
    data = b"".join(pieces)
    owners = _utf8_characters(data)
    spans = []
    offset = 0
    for piece in pieces:
        if piece:
            spans.append((owners[offset], owners[offset + len(piece) - 1] + 1))
        else:
            at = owners[offset] if offset < len(owners) else (owners[-1] + 1 if owners else 0)
            spans.append((at, at))
        offset += len(piece)
    return data.decode("utf-8", errors="replace"), spans


def _common_prefix_length(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# ----------------------------------------------------------------------------------------------------------------
# Languages and prompts


def normalize_language(name: str) -> str:
    """Canonical spelling of a supported language ("cHINese" -> "Chinese"); LanguageError if unsupported."""
    if name is None:
        raise LanguageError(f"language is None; supported: {', '.join(SUPPORTED_LANGUAGES)}")
    stripped = str(name).strip()
    if not stripped:
        raise LanguageError(f"language is empty; supported: {', '.join(SUPPORTED_LANGUAGES)}")
    canonical = stripped[:1].upper() + stripped[1:].lower()
    if canonical not in SUPPORTED_LANGUAGES:
        raise LanguageError(f"unsupported language {name!r}; supported: {', '.join(SUPPORTED_LANGUAGES)}")
    return canonical


def _forced_language(language: str | None) -> str | None:
    # A blank language means "detect", as in the official transcribe().
    if language is None or str(language).strip() == "":
        return None
    return normalize_language(language)


def build_prompt_text(context: str = "", language: str | None = None) -> str:
    """The ASR prompt with a single audio placeholder, as the official chat template renders it.

    `language` forces the output language: the prompt then ends in "language {Language}<asr_text>" and the model
    writes only the transcript.
    """
    prompt = (
        f"{IM_START}system\n{context or ''}{IM_END}\n"
        f"{IM_START}user\n{AUDIO_START}{AUDIO_PAD}{AUDIO_END}{IM_END}\n"
        f"{IM_START}assistant\n"
    )
    forced = _forced_language(language)
    if forced is not None:
        prompt += f"{_LANGUAGE_PREFIX}{forced}{ASR_TEXT}"
    return prompt


def _expand_audio_slot(tokenizer: Tokenizer, ids: list[int], audio_tokens: int, what: str) -> list[int]:
    if audio_tokens < 0:
        raise ValueError(f"audio_tokens must be >= 0, got {audio_tokens}")
    pad = tokenizer.audio_pad_id
    slots = [i for i, token_id in enumerate(ids) if token_id == pad]
    if len(slots) != 1:
        # A second <|audio_pad|> (from the context or the words) would take audio embeddings meant for the slot.
        raise PromptError(f"{what} must hold exactly one {AUDIO_PAD}, found {len(slots)}")
    slot = slots[0]
    return [*ids[:slot], *([pad] * audio_tokens), *ids[slot + 1 :]]


def build_prompt_ids(
    tokenizer: Tokenizer, audio_tokens: int, context: str = "", language: str | None = None
) -> list[int]:
    """Token ids of the ASR prompt with the audio slot expanded to `audio_tokens` (the encoder output length).

    Identical to the official processor applied to the chat-template prompt. Special-token strings inside
    `context` become their tokens, as in the official pipeline.
    """
    # Added tokens split the text before BPE runs, so encoding one placeholder and repeating its id gives the
    # same ids as encoding the expanded text.
    ids = tokenizer.encode(build_prompt_text(context, language))
    return _expand_audio_slot(tokenizer, ids, audio_tokens, "the ASR prompt")


# ----------------------------------------------------------------------------------------------------------------
# Output parsing and repair

REPETITION_THRESHOLD = 20
MAX_REPEATED_PATTERN = 20


def _character_runs_kept(text: str, threshold: int) -> list[int]:
    """Indices of ``text`` kept when a run of more than ``threshold`` identical characters becomes one character
    (its first)."""
    kept: list[int] = []
    start = 0
    while start < len(text):
        end = start + 1
        while end < len(text) and text[end] == text[start]:
            end += 1
        kept.extend([start] if end - start > threshold else range(start, end))
        start = end
    return kept


def _pattern_runs_kept(text: str, threshold: int, max_pattern: int) -> list[int]:
    """Indices of ``text`` kept when, scanning left to right, the first place where a pattern of 1..`max_pattern`
    characters (shortest first) repeats at least `threshold` times back to back is replaced by one copy (its
    first), and the scan resumes after the run."""
    n = len(text)
    min_run = threshold * 2
    kept: list[int] = []
    i = 0
    while i <= n - min_run:
        run_end = None
        width = 0
        for width in range(1, max_pattern + 1):
            if i + width * threshold > n:
                break
            pattern = text[i : i + width]
            if text[i : i + width * threshold] == pattern * threshold:
                run_end = i + width * threshold
                while run_end + width <= n and text[run_end : run_end + width] == pattern:
                    run_end += width
                break
        if run_end is None:
            kept.append(i)
            i += 1
        else:
            kept.extend(range(i, i + width))
            i = run_end
    kept.extend(range(i, n))
    return kept


def repair_repetitions_indexed(text: str, threshold: int = REPETITION_THRESHOLD) -> tuple[str, list[int]]:
    """``repair_repetitions(text)`` and, for each of its characters, its index in ``text`` (increasing: the
    repair only drops characters)."""
    first = _character_runs_kept(text, threshold)
    once = "".join(text[i] for i in first)
    second = _pattern_runs_kept(once, threshold, MAX_REPEATED_PATTERN)
    return "".join(once[i] for i in second), [first[i] for i in second]


def repair_repetitions(text: str, threshold: int = REPETITION_THRESHOLD) -> str:
    """Cut back runaway repetitions (a character, or a pattern of up to 20 characters, repeated >= `threshold`
    times) to one occurrence, as the official post-processing does."""
    return repair_repetitions_indexed(text, threshold)[0]


@dataclasses.dataclass(frozen=True)
class ParsedOutput:
    """The model's output split into language and text; ``repaired``: the repetition repair cut something;
    ``offsets``: for each character of ``text``, its index in the raw output it was parsed from (increasing)."""

    language: str
    text: str
    repaired: bool = False
    offsets: tuple[int, ...] = dataclasses.field(default=(), compare=False, repr=False)


def _stripped(text: str, offsets: list[int]) -> tuple[str, list[int]]:
    """``text.strip()`` with the offsets of the characters kept."""
    start = len(text) - len(text.lstrip())
    end = len(text.rstrip())
    if end <= start:
        return "", []
    return text[start:end], offsets[start:end]


def parse_model_output(raw: str | None, forced_language: str | None = None) -> ParsedOutput:
    """Split the decoded model output into language and text (see ``parse_asr_output``), say whether the
    repetition repair changed it (a runaway repetition was cut back), and where each character of the text was in
    ``raw``."""
    if raw is None:
        return ParsedOutput("", "")
    text, offsets = _stripped(str(raw), list(range(len(str(raw)))))
    if not text:
        return ParsedOutput("", "")
    repaired_text, kept = repair_repetitions_indexed(text)
    repaired = repaired_text != text
    text, offsets = repaired_text, [offsets[i] for i in kept]

    def output(language: str, start: int) -> ParsedOutput:
        transcript, where = _stripped(text[start:], offsets[start:])
        return ParsedOutput(language, transcript, repaired, tuple(where))

    if forced_language:
        return ParsedOutput(forced_language, text, repaired, tuple(offsets))
    if ASR_TEXT not in text:
        return output("", 0)
    meta = text[: text.index(ASR_TEXT)]
    body = text.index(ASR_TEXT) + len(ASR_TEXT)
    if "language none" in meta.lower():
        return output("", body)
    language = ""
    for line in meta.splitlines():
        line = line.strip()
        if not line:
            continue
        # The first line that starts with "language " decides, even when its value is blank.
        if line.lower().startswith(_LANGUAGE_PREFIX):
            value = line[len(_LANGUAGE_PREFIX) :].strip()
            if value:
                language = value[:1].upper() + value[1:].lower()
            break
    return output(language, body)


def parse_asr_output(raw: str | None, forced_language: str | None = None) -> tuple[str, str]:
    """Split the decoded model output into (language, text).

    "language X<asr_text>text" -> ("X", "text"); "language None<asr_text>" (no speech) -> ("", ""); output
    without the tag is all text with an unknown language; with `forced_language` the output is all text.
    Repetitions are repaired first.
    """
    parsed = parse_model_output(raw, forced_language)
    return parsed.language, parsed.text


def merge_languages(languages: Iterable[str | None]) -> str:
    """Per-chunk languages joined with commas, dropping empty ones and consecutive repeats."""
    merged: list[str] = []
    for language in languages:
        language = (language or "").strip()
        if language and (not merged or merged[-1] != language):
            merged.append(language)
    return ",".join(merged)


# ----------------------------------------------------------------------------------------------------------------
# Aligner text preparation

_CJK_RANGES = (
    (0x4E00, 0x9FFF),  # CJK Unified Ideographs
    (0x3400, 0x4DBF),  # Extension A
    (0x20000, 0x2A6DF),  # Extension B
    (0x2A700, 0x2B73F),  # Extension C
    (0x2B740, 0x2B81F),  # Extension D
    (0x2B820, 0x2CEAF),  # Extension E
    (0xF900, 0xFAFF),  # Compatibility Ideographs
)


def is_cjk_ideograph(char: str) -> bool:
    code = ord(char)
    return any(low <= code <= high for low, high in _CJK_RANGES)


def _is_word_character(char: str) -> bool:
    # Letters (incl. combining-free scripts), digits and the apostrophe survive; punctuation, marks, symbols go.
    return char == "'" or unicodedata.category(char)[0] in "LN"


def _keep_word_characters(token: str) -> str:
    return "".join(char for char in token if _is_word_character(char))


def _split_space_delimited(text: str) -> list[str]:
    words: list[str] = []
    for segment in text.split():
        cleaned = _keep_word_characters(segment)
        run: list[str] = []
        for char in cleaned:
            if is_cjk_ideograph(char):
                if run:
                    words.append("".join(run))
                    run = []
                words.append(char)
            else:
                run.append(char)
        if run:
            words.append("".join(run))
    return words


def _split_japanese(text: str) -> list[str]:
    try:
        import nagisa
    except ImportError:
        raise MissingExtraError(
            "Japanese word segmentation needs nagisa: pip install 'qasr-jax[ja]'"
        ) from None
    return [cleaned for word in nagisa.tagging(text).words if (cleaned := _keep_word_characters(word))]


KOREAN_DICTIONARY_NAME = "korean_dict_jieba.dict"
KOREAN_DICTIONARY_ENV = "QASR_KOREAN_DICT"


def default_korean_dictionary() -> Path:
    """Where the Korean word list (the one the official aligner segments with) is found.

    In order: ``$QASR_KOREAN_DICT``; the copy inside an installed ``qwen-asr`` package (located without importing
    it). The list is data of the official package and is not redistributed here.
    """
    env = os.environ.get(KOREAN_DICTIONARY_ENV)
    if env:
        return Path(env)
    import importlib.util

    spec = importlib.util.find_spec("qwen_asr")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            found = sorted(Path(root).rglob(KOREAN_DICTIONARY_NAME))
            if found:
                return found[0]
    return Path(KOREAN_DICTIONARY_NAME)


_korean_segmenters: dict[Path, Any] = {}


def _korean_segmenter(dictionary: Path) -> Any:
    segmenter = _korean_segmenters.get(dictionary)
    if segmenter is not None:
        return segmenter
    try:
        from soynlp.tokenizer import LTokenizer
    except ImportError:
        raise MissingExtraError("Korean word segmentation needs soynlp: pip install 'qasr-jax[ko]'") from None
    try:
        # Text-mode line iteration (universal newlines), not str.splitlines, to split where the official reader does.
        with open(dictionary, encoding="utf-8") as handle:
            lines = list(handle)
    except FileNotFoundError:
        raise MissingExtraError(
            f"{dictionary}: the Korean word list ({KOREAN_DICTIONARY_NAME}) is missing; set ${KOREAN_DICTIONARY_ENV} "
            "to its path or install the qwen-asr package that carries it (pip install --no-deps qwen-asr)"
        ) from None
    # Every listed word scores 1.0: the segmenter picks the longest listed prefix of each space-separated part.
    scores = {line.split()[0]: 1.0 for line in lines if line.strip()}
    segmenter = LTokenizer(scores=scores)
    _korean_segmenters[dictionary] = segmenter
    return segmenter


def _split_korean(text: str, dictionary: Path) -> list[str]:
    segmenter = _korean_segmenter(dictionary)
    return [cleaned for word in segmenter.tokenize(text) if (cleaned := _keep_word_characters(word))]


def split_words(
    text: str, language: str | None = None, *, korean_dictionary: str | Path | None = None
) -> list[str]:
    """The aligner's word units of `text`.

    Japanese uses nagisa and Korean soynlp (optional extras); every other language splits on whitespace, keeps only
    letters, digits and apostrophes, and makes each CJK ideograph its own word. `language` is compared
    case-insensitively and need not be a supported language.
    """
    key = (language or "").lower()
    if key == "japanese":
        return _split_japanese(text)
    if key == "korean":
        dictionary = Path(korean_dictionary) if korean_dictionary is not None else default_korean_dictionary()
        return _split_korean(text, dictionary)
    return _split_space_delimited(text)


def locate_words(words: Sequence[str], text: str) -> list[tuple[int, int]] | None:
    """Where each word's characters are in ``text`` (matched in order): ``[(first, last + 1)]``, or None.

    The aligner's words (``split_words``) hold exactly the letters, digits and apostrophes of the text, in order,
    so matching each character at its next occurrence finds them; a text they did not come from fails to match.
    """
    spans = []
    position = 0
    for word in words:
        first = -1
        for char in word:
            position = text.find(char, position)
            if position < 0:
                return None
            if first < 0:
                first = position
            position += 1
        if first < 0:
            return None
        spans.append((first, position))
    return spans


def word_pieces(words: Sequence[str], text: str) -> list[tuple[int, int]] | None:
    """``text`` cut into one piece per word, ``[(start, end)]``, or None when the words are not in it.

    A piece runs from the first whitespace after the previous word (the start of its own word when nothing but
    punctuation lies between, as in Chinese) to the same point after it: a word takes the space before it and
    the punctuation after it. The first piece starts at 0 and the last ends at ``len(text)``, so the pieces
    concatenate back to ``text``.
    """
    spans = locate_words(words, text)
    if spans is None:
        return None
    cuts = [0]
    for (_, previous_end), (start, _) in itertools.pairwise(spans):
        space = next((i for i in range(previous_end, start) if text[i].isspace()), None)
        cuts.append(space if space is not None else start)
    cuts.append(len(text))
    return list(itertools.pairwise(cuts))


def build_aligner_text(words: Sequence[str]) -> str:
    """The aligner input with a single audio placeholder: each word followed by two `<timestamp>` slots (its
    start and end). With no words it still ends in one pair of slots, as the official code does."""
    slots = TIMESTAMP + TIMESTAMP
    return f"{AUDIO_START}{AUDIO_PAD}{AUDIO_END}" + slots.join(words) + slots


def build_aligner_ids(tokenizer: Tokenizer, words: Sequence[str], audio_tokens: int) -> list[int]:
    """Token ids of the aligner input with the audio slot expanded to `audio_tokens`."""
    ids = tokenizer.encode(build_aligner_text(words))
    return _expand_audio_slot(tokenizer, ids, audio_tokens, "the aligner input")


def _longest_non_decreasing(values: Sequence[float]) -> list[bool]:
    """Membership mask of one longest non-decreasing subsequence.

    Among equally long ones this picks the one the official O(n^2) search picks: it ends at the first index that
    reaches the maximum length, and each element's predecessor is the earliest index giving the longest chain.
    A Fenwick tree over value ranks keeps it O(n log n).
    """
    n = len(values)
    ranks = sorted(set(values))
    size = len(ranks)
    # Each node holds the best (length, -index) over its range of value ranks.
    tree: list[tuple[int, int]] = [(0, 1)] * (size + 1)
    lengths = [0] * n
    parents = [-1] * n
    for i, value in enumerate(values):
        rank = bisect.bisect_right(ranks, value)  # 1-based rank; prefix covers every value <= this one
        best = (0, 1)
        position = rank
        while position > 0:
            best = max(best, tree[position])
            position -= position & -position
        lengths[i] = best[0] + 1
        parents[i] = -best[1] if best[0] > 0 else -1
        entry = (lengths[i], -i)
        position = rank
        while position <= size:
            if entry > tree[position]:
                tree[position] = entry
            position += position & -position
    longest = max(lengths)
    index = lengths.index(longest)
    keep = [False] * n
    while index != -1:
        keep[index] = True
        index = parents[index]
    return keep


def repair_timestamps(values: Sequence[float]) -> list[int]:
    """Make predicted timestamps (ms) monotonic the way the official aligner does.

    The longest non-decreasing subsequence is kept; a run of at most two outliers takes the value of the nearer
    kept neighbour (the left one on a tie), a longer run is interpolated linearly between its kept neighbours
    (or copies the only one). Results are truncated to int.
    """
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return []
    keep = _longest_non_decreasing(values)
    result = list(values)
    i = 0
    while i < n:
        if keep[i]:
            i += 1
            continue
        j = i
        while j < n and not keep[j]:
            j += 1
        # Runs are maximal, so the kept neighbours are exactly i - 1 and j when they exist.
        left = result[i - 1] if i > 0 else None
        right = result[j] if j < n else None
        if j - i <= 2:
            for k in range(i, j):
                if left is None:
                    result[k] = right
                elif right is None or (k - (i - 1)) <= (j - k):
                    result[k] = left
                else:
                    result[k] = right
        elif left is not None and right is not None:
            step = (right - left) / (j - i + 1)
            for k in range(i, j):
                result[k] = left + step * (k - i + 1)
        else:
            for k in range(i, j):
                result[k] = left if left is not None else right
        i = j
    return [int(v) for v in result]
