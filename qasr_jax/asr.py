"""Qwen3ASRModel: the official ``qwen_asr.Qwen3ASRModel`` API on the compiled JAX engine.

``transcribe`` takes one audio or a list (paths, encoded bytes, ``(samples, sample_rate)``), with a context and a
forced language that broadcast or come per item, and returns one ``ASRTranscription`` per input, in order:

1. load every input (a bad one becomes that item's ``error``; the rest go on);
2. split long audio with the official rule (≤ ``max_chunk_seconds``, 180 s when timestamps are asked for), or
   with the voice-activity detector when asked (``vad``; ``qasr_jax.vad``): chunks cut in non-speech, and the
   spans without speech not decoded at all;
3. build each chunk's prompt, give it a token budget (``max_new_tokens``, or one that grows with its duration);
4. run all chunks of all items through the engine (``Engine.run``) in batches of similar length;
5. decode, parse ``language X<asr_text>text`` with the official repair into one ``Segment`` per chunk (its
   token ids and their log-probabilities, ``finish_reason``; ``qasr_jax.transcript``), merge each item's chunks;
6. optionally align the text with a forced aligner and shift its timestamps by each chunk's offset.

``iter_transcribe`` yields ``(index, result)`` pairs as items complete, for progress reporting.

Adapters (``qasr_jax.adapters``, PEFT LoRA dirs): loaded by name (``from_pretrained(adapters={"name": dir})`` or
``load_adapter``), picked per item with ``transcribe(..., adapter=NAME)``; items with different adapters (and
the base model, ``adapter=None``) are decoded together in the same batches.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from qasr_jax import adapters as lora
from qasr_jax import audio as audio_io
from qasr_jax import audio_files, compile_cache, sharding
from qasr_jax import text as text_io
from qasr_jax.aligner import Qwen3ForcedAligner
from qasr_jax.chunks import Chunk, finish, merged_language, merged_text, plan_item
from qasr_jax.config import ThinkerConfig
from qasr_jax.engine import BatchShape, DecodeOptions, DecodeRequest, DecodeResult, Engine
from qasr_jax.errors import EmptyAudioError, QasrError
from qasr_jax.hub import resolve_model
from qasr_jax.streaming import ASRStreamingState, StreamingTranscriber
from qasr_jax.transcript import (
    FinishReason,
    Segment,
    Word,
    compression_ratio,
    item_finish_reason,
    mean_logprob,
    with_word_confidences,
)
from qasr_jax.vad import PlannedPiece, SpeechDetector

MAX_ASR_CHUNK_SECONDS = 1200.0
MAX_ALIGN_CHUNK_SECONDS = 180.0

# Token budget of a chunk when max_new_tokens is None: the "language X<asr_text>" header and the end token,
# plus enough for very fast speech (about 12 tokens per second of audio; fast Mandarin is ~8 characters/s).
BASE_NEW_TOKENS = 32
NEW_TOKENS_PER_SECOND = 12.0


class TimestampsUnavailableError(QasrError, NotImplementedError):
    """Timestamps were asked for but no forced aligner can provide them."""


@dataclasses.dataclass
class ASRTranscription:
    """One transcription result (the official fields first).

    language: merged language of the item's chunks, e.g. "English" or "Chinese,English"; "" when unknown/silent.
    text: the transcript.
    time_stamps: the forced aligner's result (its items shifted to the item's time line), when asked for.
    truncated: some chunk used its whole token budget without an end token; the text may be cut short.
    error: why the item failed (a ``QasrError`` naming the input; "" text and language then), or None.
    segments: one ``Segment`` per chunk, in order: its time span, text, generated token ids with their
        log-probabilities, ``avg_logprob``, ``compression_ratio`` and ``finish_reason``; with the voice-activity
        detector, also its ``no_speech`` estimate, and the spans without speech are chunks of their own that
        were not decoded (``finish_reason`` no_speech).

    Per item: ``finish_reason`` (error, else the most telling of the chunks': repetition, length, stop, and
    no_speech when the detector found speech in none),
    ``avg_logprob`` (over every generated token of every chunk; None when there are none), ``compression_ratio``
    (of ``text``), ``token_ids`` and ``token_logprobs`` (the chunks' in order), and ``words``: the text as words,
    each with its ``confidence`` (the mean probability of the tokens it spans; ``qasr_jax.transcript.Word``),
    which concatenate back to ``text``. With timestamps, each word of ``time_stamps`` carries the same
    ``confidence``.
    """

    language: str
    text: str
    time_stamps: Any | None = None
    truncated: bool = False
    error: QasrError | None = None
    segments: list[Segment] = dataclasses.field(default_factory=list)

    @property
    def finish_reason(self) -> FinishReason:
        return item_finish_reason(self.segments, failed=self.error is not None)

    @property
    def token_ids(self) -> list[int]:
        return [i for segment in self.segments for i in segment.token_ids]

    @property
    def token_logprobs(self) -> list[float]:
        return [p for segment in self.segments for p in segment.logprobs]

    @property
    def avg_logprob(self) -> float | None:
        return mean_logprob(self.token_logprobs)

    @property
    def compression_ratio(self) -> float:
        return compression_ratio(self.text)

    @property
    def words(self) -> list[Word]:
        return [word for segment in self.segments for word in segment.words]


def default_token_budget(seconds: float) -> int:
    """Tokens a chunk of ``seconds`` of audio may generate when no fixed max_new_tokens is set."""
    return BASE_NEW_TOKENS + math.ceil(NEW_TOKENS_PER_SECOND * max(seconds, 0.0))


def resolve_dtype(dtype: Any) -> Any:
    """A JAX dtype from None (fp32 on CPU, bf16 on accelerators), a name ("bfloat16", "torch.float16") or a dtype."""
    if dtype is None:
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if not isinstance(dtype, str) and not hasattr(dtype, "dtype") and not isinstance(dtype, type):
        dtype = str(dtype)  # e.g. torch.bfloat16 → "torch.bfloat16"
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.").lower()
        names = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
                 "float16": jnp.float16, "fp16": jnp.float16, "auto": None}  # fmt: skip
        if name not in names:
            raise ValueError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16")
        return resolve_dtype(names[name])
    return jnp.dtype(dtype).type


def read_generation_ids(path: str | os.PathLike, tokenizer: text_io.Tokenizer) -> tuple[tuple[int, ...], int]:
    """(end token ids, pad token id) from generation_config.json, else <|im_end|>/<|endoftext|>."""
    eos: tuple[int, ...] = (tokenizer.im_end_id, tokenizer.endoftext_id)
    pad = tokenizer.endoftext_id
    file = os.path.join(os.fspath(path), "generation_config.json")
    if os.path.isfile(file):
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
        value = raw.get("eos_token_id")
        if isinstance(value, int):
            eos = (value,)
        elif isinstance(value, list) and value:
            eos = tuple(int(v) for v in value)
        if isinstance(raw.get("pad_token_id"), int):
            pad = raw["pad_token_id"]
    return eos, pad


def _load_forced_aligner(forced_aligner: Any, kwargs: dict[str, Any] | None) -> Any:
    """An aligner object from a checkpoint path (or an already built aligner, passed through)."""
    if forced_aligner is None or not isinstance(forced_aligner, (str, os.PathLike)):
        return forced_aligner
    return Qwen3ForcedAligner.from_pretrained(os.fspath(forced_aligner), **(kwargs or {}))


def _broadcast(values: Any, n: int, name: str) -> list[Any]:
    """A scalar or list argument as one value per item, with the official mismatch message."""
    values = values if isinstance(values, list) else [values]
    if len(values) == 1 and n > 1:
        values = values * n
    if len(values) != n:
        raise ValueError(f"Batch size mismatch: audio={n}, {name}={len(values)}")
    return values


@dataclasses.dataclass
class _Item:
    language: str | None  # forced language (canonical) or None
    context: str
    adapter: int = 0  # slot in the model's adapter stack (0: the base model)
    chunks: list[Chunk] = dataclasses.field(default_factory=list)
    pending: int = 0
    error: QasrError | None = None


class Qwen3ASRModel:
    """Qwen3-ASR speech recognition on JAX (see the module docstring)."""

    def __init__(
        self,
        config: ThinkerConfig,
        params: Any,
        tokenizer: text_io.Tokenizer,
        *,
        forced_aligner: Any = None,
        max_inference_batch_size: int = 32,
        max_new_tokens: int | None = None,
        dtype: Any = jnp.float32,
        attention_impl: str = "auto",
        max_chunk_seconds: float = MAX_ASR_CHUNK_SECONDS,
        max_audio_seconds: float | None = None,
        decode_options: DecodeOptions | None = None,
        mesh: Mesh | None = None,
        sharding_rules: sharding.Rules = sharding.DEFAULT_RULES,
        vad: bool | SpeechDetector = False,
    ) -> None:
        if config.is_aligner:
            raise ValueError("this checkpoint is a forced aligner, not an ASR model")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be None or >= 1, got {max_new_tokens}")
        if not max_chunk_seconds > 0:
            raise ValueError(f"max_chunk_seconds must be positive, got {max_chunk_seconds}")
        self.config = config
        self.tokenizer = tokenizer
        self.forced_aligner = forced_aligner
        # The official -1 (no limit) becomes one batch per call, bucketed to a power of two.
        self.max_inference_batch_size = int(max_inference_batch_size)
        self.max_new_tokens = max_new_tokens
        self.max_chunk_seconds = float(max_chunk_seconds)
        if max_audio_seconds is not None and not max_audio_seconds > 0:
            raise ValueError(f"max_audio_seconds must be None or positive, got {max_audio_seconds}")
        self.max_audio_seconds = max_audio_seconds
        max_batch = self.max_inference_batch_size if self.max_inference_batch_size > 0 else 1 << 30
        self._streamer: StreamingTranscriber | None = None
        # The voice-activity detector every call uses (None: the official split, every chunk decoded).
        self.speech_detector: SpeechDetector | None = (
            vad if isinstance(vad, SpeechDetector) else SpeechDetector() if vad else None
        )
        self._call_detector: SpeechDetector | None = None  # made for calls that ask for one
        self._planning_threads: concurrent.futures.ThreadPoolExecutor | None = None
        self.params = params
        self.max_batch = max_batch  # chunks decoded in one batch
        self.decode_options = decode_options or DecodeOptions()
        self.engines: dict[DecodeOptions, Engine] = {}
        self._engine_args = dict(dtype=dtype, attention_impl=attention_impl, mesh=mesh, sharding_rules=sharding_rules)
        self.adapters: dict[str, lora.Adapter] = {}
        self._adapter_stack: lora.AdapterStack | None = None
        self._adapter_dtype = dtype

    def load_adapter(self, name: str, path: str | os.PathLike | lora.Adapter) -> None:
        """Make a LoRA adapter (a PEFT adapter dir, or a loaded ``Adapter``) available as ``adapter=name``."""
        if not name:
            raise lora.AdapterError("an adapter needs a non-empty name")
        adapter = path if isinstance(path, lora.Adapter) else lora.load_peft(path, self.config, name)
        self.adapters[name] = dataclasses.replace(adapter, name=name)
        self._adapter_stack = lora.stack_adapters(self.config, list(self.adapters.values()), self._adapter_dtype)

    @property
    def adapter_stack(self) -> lora.AdapterStack | None:
        """Every loaded adapter stacked for per-row use (None when none is loaded)."""
        return self._adapter_stack

    def adapter_slot(self, name: str | None) -> int:
        """The stack slot of an adapter name (None or "": the base model); ``UnknownAdapterError`` if unknown."""
        if not name:
            return 0
        if self._adapter_stack is None:
            raise lora.UnknownAdapterError(f"adapter {name!r} is not loaded (loaded: none)")
        return self._adapter_stack.slot(name)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        forced_aligner: Any = None,
        forced_aligner_kwargs: dict[str, Any] | None = None,
        max_inference_batch_size: int = 32,
        max_new_tokens: int | None = None,
        dtype: Any = None,
        *,
        attention_impl: str = "auto",
        max_chunk_seconds: float = MAX_ASR_CHUNK_SECONDS,
        max_audio_seconds: float | None = None,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        suppress_tokens: Sequence[int] = (),
        eos_token_ids: Sequence[int] | None = None,
        mesh: Mesh | str | None = None,
        sharding_rules: Any = None,
        compilation_cache: str | os.PathLike | bool | None = None,
        weights_cache: str | os.PathLike | bool | None = None,
        adapters: dict[str, str | os.PathLike] | None = None,
        vad: bool | SpeechDetector = False,
        revision: str | None = None,
    ) -> Qwen3ASRModel:
        """Load a checkpoint (released, "-hf" or Orbax layout) with its tokenizer and generation config.

        Args:
          pretrained_model_name_or_path: a checkpoint dir, or a Hugging Face Hub model name such as
            ``Qwen/Qwen3-ASR-0.6B``, fetched into (or, with ``HF_HUB_OFFLINE=1``, only read from) the hub cache;
            an existing local path always wins (``qasr_jax.hub.resolve_model``).
          forced_aligner: a ForcedAligner checkpoint dir or Hub model name (or an aligner object with ``align``)
            for timestamps; its revision, if not ``main``, goes in ``forced_aligner_kwargs={"revision": ...}``.
          max_inference_batch_size: chunks decoded together; -1 for all of a call at once.
          max_new_tokens: a fixed token budget per chunk; None (default) scales it with the chunk's duration
            (``default_token_budget``) so fast speech is not cut off.
          dtype: params and compute dtype; None = fp32 on CPU, bf16 on GPU/TPU.
          max_chunk_seconds: long audio is split into chunks of at most this (timestamps: at most 180 s).
          max_audio_seconds: audio longer than this is refused (``AudioTooLongError`` for that item); no limit
            by default.
          repetition_penalty, no_repeat_ngram_size: optional repetition control in the decode loop (off).
          suppress_tokens: token ids never generated.
          eos_token_ids: end tokens; default from generation_config.json (<|im_end|>, <|endoftext|>).
          mesh: a device mesh or a spec such as "data=2,tensor=4" (``qasr_jax.sharding``): params are loaded
            straight into it and every batch is split over it; a forced aligner loaded here shares it.
          sharding_rules: overrides of ``sharding.DEFAULT_RULES`` (logical axis → mesh axes).
          compilation_cache: JAX's persistent compilation cache (``qasr_jax.compile_cache``): None = the
            ``QASR_COMPILATION_CACHE`` environment variable or ``~/.cache/qasr-jax/xla``; a directory; False: off.
          weights_cache: the converted-weights cache (``weights.load_pretrained``): None = the
            ``QASR_WEIGHTS_CACHE`` environment variable or ``~/.cache/qasr-jax/weights``; a directory; False: off.
            A safetensors checkpoint is converted to the param layout once per machine; later loads map it.
          adapters: ``{name: PEFT LoRA adapter dir}`` to load (``load_adapter``), picked per item by name.
          vad: True (or a ``qasr_jax.vad.SpeechDetector`` with its own options) runs the voice-activity
            detector on every item: long audio is cut in non-speech, spans without speech are not decoded, and
            segments carry a ``no_speech`` estimate. Needs the ``[vad]`` extra. Off by default (the official
            split; results as the official pipeline's).
          revision: for a Hub model name, the branch, tag or commit to load (default ``main``).

        Raises ``ModelNotFoundError`` for a model that is neither a local path nor a Hub repo that can be had.
        """
        compile_cache.enable(compilation_cache)
        path = resolve_model(pretrained_model_name_or_path, revision)
        compute_dtype = resolve_dtype(dtype)
        config, params, mesh, rules = sharding.load_placed(
            path, compute_dtype, mesh, sharding_rules, weights_cache
        )
        if mesh is not None:
            forced_aligner_kwargs = {"mesh": mesh, "sharding_rules": rules, **(forced_aligner_kwargs or {})}
        tokenizer = text_io.Tokenizer.from_pretrained(path)
        eos, pad = read_generation_ids(path, tokenizer)
        options = DecodeOptions(
            eos_token_ids=tuple(int(i) for i in eos_token_ids) if eos_token_ids is not None else eos,
            pad_token_id=pad,
            suppress_token_ids=tuple(int(i) for i in suppress_tokens),
            repetition_penalty=float(repetition_penalty),
            no_repeat_ngram_size=int(no_repeat_ngram_size),
        )
        model = cls(
            config,
            params,
            tokenizer,
            forced_aligner=_load_forced_aligner(forced_aligner, forced_aligner_kwargs),
            max_inference_batch_size=max_inference_batch_size,
            max_new_tokens=max_new_tokens,
            dtype=compute_dtype,
            attention_impl=attention_impl,
            max_chunk_seconds=max_chunk_seconds,
            max_audio_seconds=max_audio_seconds,
            decode_options=options,
            mesh=mesh,
            sharding_rules=rules,
            vad=vad,
        )
        for name, adapter_dir in (adapters or {}).items():
            model.load_adapter(name, adapter_dir)
        return model

    def engine(self, options: DecodeOptions | None = None) -> Engine:
        """The engine (and its compiled programs) for ``options`` (default: the model's ``decode_options``)."""
        options = options or self.decode_options
        if options not in self.engines:
            self.engines[options] = Engine(self.config, options=options, **self._engine_args)
        return self.engines[options]

    def decode_batch(
        self,
        requests: Sequence[DecodeRequest],
        options: DecodeOptions | None = None,
        adapters: lora.AdapterStack | None = None,
    ) -> list[DecodeResult]:
        """One batch of chunks decoded to completion in the bucket of its longest audio, prompt and budget
        (``Engine.run``); ``adapters``: the stack the requests' adapter slots refer to."""
        if not requests:
            return []
        engine = self.engine(options)
        if not any(r.adapter for r in requests):
            adapters = None
        return engine.run(self.params, requests, engine.batch_shape(requests, self.max_batch), adapters)

    @property
    def compiled_shapes(self) -> list[BatchShape]:
        """The batch buckets run so far, each compiled once (per decoding options)."""
        return [shape for engine in self.engines.values() for shape in engine.batch_shapes]

    @property
    def compile_count(self) -> int:
        """Batch buckets compiled so far by this model object."""
        return len(self.compiled_shapes)

    @property
    def compile_seconds(self) -> float:
        """Seconds spent compiling this model object's programs."""
        return sum(engine.programs.seconds for engine in self.engines.values())

    def get_supported_languages(self) -> list[str]:
        return list(text_io.SUPPORTED_LANGUAGES)

    # -- streaming (``qasr_jax.streaming``) --

    @property
    def streamer(self) -> StreamingTranscriber:
        """The streaming transcriber over this model's params and engine (made on first use)."""
        if self._streamer is None:
            budget = (lambda _: self.max_new_tokens) if self.max_new_tokens else default_token_budget
            self._streamer = StreamingTranscriber(
                self.config, self.params, self.tokenizer, self.engine(), budget
            )
        return self._streamer

    def init_streaming_state(
        self,
        context: str = "",
        language: str | None = None,
        unfixed_chunk_num: int = 2,
        unfixed_token_num: int = 5,
        chunk_size_sec: float = 2.0,
    ) -> ASRStreamingState:
        """A new stream (the official arguments): audio is decoded every ``chunk_size_sec``; the previous output
        less its last ``unfixed_token_num`` tokens is the next prompt's prefix after the first
        ``unfixed_chunk_num`` chunks."""
        return self.streamer.init_state(
            context, language, unfixed_chunk_num, unfixed_token_num, chunk_size_sec
        )

    def streaming_transcribe(self, pcm16k: Any, state: ASRStreamingState) -> ASRStreamingState:
        """Feed 16 kHz mono samples (int16 PCM or floats, any length); updates ``state.language``/``.text``
        once per completed chunk and returns ``state``."""
        return self.streamer.transcribe(pcm16k, state)

    def finish_streaming_transcribe(
        self, state: ASRStreamingState, return_time_stamps: bool = False
    ) -> ASRStreamingState:
        """Decode the buffered tail (if any) for the final result; the stream then takes no more audio.

        ``return_time_stamps`` (beyond the official API, needs a forced aligner) aligns the final text to the
        whole stream: ``state.time_stamps`` is the aligner's result on the stream's time line (its ``error`` says
        why when the stream cannot be aligned, e.g. longer than the aligner's limit), each word with its
        confidence from the tokens behind the final text (``StreamUpdate.segment``).
        """
        self._check_time_stamps(return_time_stamps)
        state = self.streamer.finish(state)
        if return_time_stamps:
            audio = (state.audio_accum, audio_io.SAMPLE_RATE)
            alignment = self.forced_aligner.align(audio, state.text, state.language or None)[0]
            segments = [state.updates[-1].segment] if state.updates and state.updates[-1].segment else []
            state.time_stamps = with_word_confidences(alignment, segments)
        return state

    def transcribe(
        self,
        audio: Any,
        context: str | list[str] = "",
        language: str | list[str | None] | None = None,
        return_time_stamps: bool = False,
        adapter: str | list[str | None] | None = None,
        vad: bool | None = None,
    ) -> list[ASRTranscription]:
        """Transcribe one audio or a list; one ``ASRTranscription`` per input, in order.

        ``adapter``: the name of a loaded adapter for all items or per item (None: the base model).
        ``vad``: run the voice-activity detector for this call (True) or not (False); None (default): as the
        model was made (``from_pretrained(..., vad=...)``). With it, an item with no speech is not decoded and
        returns "" text and language with ``finish_reason`` no_speech.

        Raises ValueError for arguments that do not fit (mismatched list lengths, an unsupported language,
        timestamps without a forced aligner, an adapter that is not loaded); problems with one input
        (unreadable, empty) are reported in that item's ``error`` instead.
        """
        results: dict[int, ASRTranscription] = dict(
            self.iter_transcribe(audio, context, language, return_time_stamps, adapter, vad)
        )
        return [results[i] for i in range(len(results))]

    def iter_transcribe(
        self,
        audio: Any,
        context: str | list[str] = "",
        language: str | list[str | None] | None = None,
        return_time_stamps: bool = False,
        adapter: str | list[str | None] | None = None,
        vad: bool | None = None,
    ) -> Iterator[tuple[int, ASRTranscription]]:
        """Like ``transcribe``, but yields ``(input index, result)`` as each item completes."""
        self._check_time_stamps(return_time_stamps)
        sources = audio if isinstance(audio, list) else [audio]
        n = len(sources)
        if n == 0:
            return
        contexts = _broadcast(context, n, "context")
        languages = [None] * n if language is None else _broadcast(language, n, "language")
        forced = [
            None if lang is None or str(lang).strip() == "" else text_io.normalize_language(str(lang))
            for lang in languages
        ]
        max_seconds = min(self.max_chunk_seconds, MAX_ALIGN_CHUNK_SECONDS) if return_time_stamps else (
            self.max_chunk_seconds
        )  # fmt: skip

        adapter_slots = [self.adapter_slot(a) for a in ([None] * n if adapter is None else _broadcast(adapter, n, "adapter"))]
        items = [_Item(language=lang, context=ctx or "", adapter=slot)
                 for lang, ctx, slot in zip(forced, contexts, adapter_slots)]  # fmt: skip
        detector = self._detector(vad)

        def prepare(index: int) -> _Item:
            item = items[index]
            try:
                item.chunks = self._prepare_chunks(index, sources[index], item, max_seconds, detector)
            except QasrError as error:  # a bad input is that input's result; anything else is a bug
                item.error = error
            return item

        # The detector scores 32 ms windows one after another on the CPU: items are planned on as many threads
        # as there are cores (ONNX Runtime runs without the GIL), so it keeps up with an accelerator.
        prepared = map(prepare, range(n)) if detector is None else self._planner().map(prepare, range(n))
        chunks: list[Chunk] = []
        for index, item in enumerate(prepared):
            decoded = [c for c in item.chunks if c.request is not None]
            item.pending = len(decoded)
            chunks.extend(decoded)
            if item.error is not None or item.pending == 0:  # failed, or no speech to decode
                yield index, self._merge(item)

        # Similar lengths share a batch (less padding, fewer distinct shapes); longest first, so a batch that
        # does not fit in memory fails before any work is spent on the others.
        order = sorted(chunks, key=lambda c: -len(c.piece.samples))
        batch_size = self.max_batch
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            self._run_batch(batch, items)
            completed = []
            for chunk in batch:
                items[chunk.owner].pending -= 1
                if items[chunk.owner].pending == 0:
                    completed.append(chunk.owner)
            results = {index: self._merge(items[index]) for index in completed}
            if return_time_stamps:
                self._align(items, [i for i in completed if items[i].error is None], results)
            yield from sorted(results.items())

    def _check_time_stamps(self, return_time_stamps: bool) -> None:
        if return_time_stamps and self.forced_aligner is None:
            raise ValueError("return_time_stamps=True requires `forced_aligner` to be provided at initialization.")

    def _planner(self) -> concurrent.futures.ThreadPoolExecutor:
        """The threads that plan items with the detector (made on first use, kept: each keeps its detector
        state)."""
        if self._planning_threads is None:
            self._planning_threads = concurrent.futures.ThreadPoolExecutor(
                min(8, os.cpu_count() or 1), thread_name_prefix="qasr-vad"
            )
        return self._planning_threads

    def _detector(self, vad: bool | None) -> SpeechDetector | None:
        """The detector a call uses: the model's (vad None), none (False), or the model's or a default one."""
        if vad is None or (vad and self.speech_detector is not None):
            return self.speech_detector
        if not vad:
            return None
        if self._call_detector is None:
            self._call_detector = SpeechDetector()
        return self._call_detector

    def plan_chunks(
        self, samples: np.ndarray, max_seconds: float, detector: SpeechDetector | None
    ) -> list[PlannedPiece]:
        """An item's chunks in order: the official split (every piece decoded), or with ``detector`` the pieces
        of ``qasr_jax.vad.plan_pieces`` (speech cut in non-speech; non-speech pieces are not decoded)."""
        if detector is None:
            return [PlannedPiece(piece) for piece in audio_io.split_audio(samples, max_seconds)]
        return detector.plan(samples, max_seconds)

    def chunk_request(
        self, piece: audio_io.AudioPiece, context: str, language: str | None, adapter: int = 0
    ) -> DecodeRequest:
        """A chunk's prompt (audio slots for its frames, the context, a forced language), token budget and
        adapter slot."""
        frames = audio_io.num_frames(len(piece.samples))
        prompt = text_io.build_prompt_ids(
            self.tokenizer, self.config.audio.output_length(frames), context, language
        )
        budget = self.max_new_tokens or default_token_budget(len(piece.samples) / audio_io.SAMPLE_RATE)
        return DecodeRequest(piece.samples, prompt, budget, adapter)

    def _prepare_chunks(
        self, index: int, source: Any, item: _Item, max_seconds: float, detector: SpeechDetector | None
    ) -> list[Chunk]:
        samples = audio_io.load_audio(
            source, name=_source_name(index, source), max_seconds=self.max_audio_seconds
        )
        if audio_io.num_frames(len(samples)) == 0:
            raise EmptyAudioError(
                f"{_source_name(index, source)}: {len(samples)} samples is shorter than one feature frame "
                f"({audio_io.HOP_LENGTH} samples at 16 kHz)"
            )
        return self.item_chunks(index, samples, item.context, item.language, item.adapter, max_seconds, detector)

    def item_chunks(
        self,
        owner: Any,
        samples: np.ndarray,
        context: str,
        language: str | None,
        adapter: int,
        max_seconds: float,
        detector: SpeechDetector | None,
    ) -> list[Chunk]:
        """An item's chunks (``qasr_jax.chunks``), planned by ``plan_chunks``, each with its ``chunk_request``;
        ``owner``: what the chunks belong to."""
        plan = self.plan_chunks(samples, max_seconds, detector)
        return plan_item(owner, plan, lambda piece: self.chunk_request(piece, context, language, adapter))

    def _run_batch(self, batch: list[Chunk], items: list[_Item]) -> None:
        """Generate, decode and parse a batch. Inputs were validated when their chunks were made, so a failure
        here (out of memory, a bug) is not any one item's: it surfaces as itself."""
        results = self.decode_batch([c.request for c in batch], adapters=self._adapter_stack)
        for chunk, result in zip(batch, results):
            finish(chunk, self.tokenizer, result, items[chunk.owner].language)

    def _align(self, items: list[_Item], indices: list[int], results: dict[int, ASRTranscription]) -> None:
        """Word timestamps for the completed items ``indices``, aligned together, into their results."""
        if not indices:
            return
        alignments = self.forced_aligner.align_transcripts(
            [[c.piece for c in items[i].chunks] for i in indices],
            [[c.segment.text for c in items[i].chunks] for i in indices],
            [[c.segment.language for c in items[i].chunks] for i in indices],
        )
        for index, alignment in zip(indices, alignments):
            segments = [c.segment for c in items[index].chunks]
            results[index].time_stamps = with_word_confidences(alignment, segments)

    def _merge(self, item: _Item) -> ASRTranscription:
        if item.error is not None:
            return ASRTranscription(language="", text="", error=item.error)
        return ASRTranscription(
            language=merged_language(item.chunks),
            text=merged_text(item.chunks),
            truncated=any(c.truncated for c in item.chunks),
            segments=[c.segment for c in item.chunks],
        )


def _source_name(index: int, source: Any) -> str:
    return audio_files.describe(source, f"item {index}")


__all__ = [
    "ASRTranscription",
    "Qwen3ASRModel",
    "TimestampsUnavailableError",
    "default_token_budget",
]
