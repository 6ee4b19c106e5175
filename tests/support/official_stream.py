"""The official streaming algorithm with its vLLM generation call served by the official transformers model.

``qwen_asr.Qwen3ASRModel.streaming_transcribe`` runs only with the vLLM backend (``qwen-asr[vllm]`` pins vLLM
0.14.0): it calls ``self.model.generate([{"prompt": text, "multi_modal_data": {"audio": [wav]}}],
sampling_params=...)`` and reads ``outputs[0].outputs[0].text``. ``official_streamer`` builds the official object
with that call answered by the official transformers-backend model: the processor on the same prompt string and
audio, greedy ``generate`` (encoder attention windows wired in), and the new tokens detokenised as vLLM does
(:func:`vllm_text`). Every other step — buffering, chunking, prefix rollback, parsing — is the official code's
own. Each call is recorded.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from tests.support import official


@dataclasses.dataclass
class GenerateCall:
    """One generation request of the official streaming code: its prompt string, audio, generated token ids and
    the text vLLM reports for them."""

    prompt: str
    samples: int
    token_ids: list[int]
    text: str


@dataclasses.dataclass
class _Completion:
    text: str


@dataclasses.dataclass
class _RequestOutput:
    outputs: list[_Completion]


def vllm_text(tokenizer: Any, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text vLLM 0.14 reports for the generated ``new_ids`` (greedy ``SamplingParams`` defaults: special tokens
    skipped), as its ``FastIncrementalDetokenizer`` makes it.

    A ``tokenizers`` ``DecodeStream`` is primed by stepping through the end of the prompt (the shortest suffix of 4
    to 23 tokens that decodes without U+FFFD, else the whole prompt), its output discarded; then every new token
    is stepped. A step emits text only when the text grows and does not end with U+FFFD, so the bytes of a
    character that the budget cut are never emitted (a plain ``decode`` would end with U+FFFD), and what the
    priming held back (a prompt ending with U+FFFD) comes out in front of the first new text.
    """
    from tokenizers.decoders import DecodeStream

    backend = tokenizer.backend_tokenizer
    primer = list(prompt_ids)
    if len(primer) > 4:
        for n in range(4, min(len(primer) + 1, 24)):
            if "\ufffd" not in backend.decode(primer[-n:]):
                primer = primer[-n:]
                break
    stream = DecodeStream(skip_special_tokens=True)

    def step(token: int) -> str | None:
        nonlocal stream
        try:
            return stream.step(backend, token)
        except Exception as err:
            # vLLM starts a new stream when the text stops being a continuation of the last one.
            if not str(err).startswith("Invalid prefix encountered"):
                raise
            stream = DecodeStream(skip_special_tokens=True)
            return stream.step(backend, token)

    for token in primer:
        step(int(token))
    return "".join(piece for piece in (step(int(token)) for token in new_ids) if piece is not None)


class TransformersAsVLLM:
    """Answers the official streaming code's vLLM ``generate`` with the transformers model, greedily."""

    def __init__(self, model: Any, processor: Any, max_new_tokens: int) -> None:
        self.model = model
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.calls: list[GenerateCall] = []

    def generate(
        self, inputs: list[dict[str, Any]], sampling_params: Any = None, use_tqdm: bool = False
    ) -> list:
        import torch

        outputs = []
        for item in inputs:
            (wav,) = item["multi_modal_data"]["audio"]
            batch = self.processor(
                text=[item["prompt"]], audio=[np.asarray(wav)], return_tensors="pt", padding=True
            )
            batch = batch.to(self.model.device).to(self.model.dtype)
            with torch.no_grad(), official.official_encoder_windows():
                out = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False)
            prompt_ids = batch["input_ids"][0].tolist()
            new = out.sequences[0, len(prompt_ids) :].tolist()
            text = vllm_text(self.processor.tokenizer, prompt_ids, new)
            self.calls.append(GenerateCall(item["prompt"], len(wav), new, text))
            outputs.append(_RequestOutput([_Completion(text)]))
        return outputs


def official_streamer(checkpoint: str, max_new_tokens: int) -> Any:
    """An official ``Qwen3ASRModel`` whose streaming methods run (``backend="vllm"``) on the transformers model;
    its ``model.calls`` records every generation."""
    import torch
    from qwen_asr import Qwen3ASRModel as OfficialASRModel

    reference = OfficialASRModel.from_pretrained(checkpoint, dtype=torch.float32)
    engine = TransformersAsVLLM(reference.model, reference.processor, max_new_tokens)
    return OfficialASRModel(backend="vllm", model=engine, processor=reference.processor, sampling_params=None)


def favour_tokens(checkpoint: str, dst: str, text: str, gain: float) -> str:
    """A copy of ``checkpoint`` in ``dst`` whose (tied) embedding rows of the tokens of ``text`` are ``gain``
    times larger, so greedy decoding mostly writes those tokens (e.g. pieces of Chinese characters)."""
    import shutil
    from pathlib import Path

    from safetensors.numpy import load_file, save_file
    from transformers import AutoTokenizer

    shutil.copytree(checkpoint, dst, dirs_exist_ok=True)
    ids = sorted(set(AutoTokenizer.from_pretrained(dst).encode(text)))
    path = Path(dst) / "model.safetensors"
    tensors = load_file(str(path))
    for name in ("thinker.model.embed_tokens.weight", "thinker.lm_head.weight"):
        if name in tensors:
            tensors[name] = tensors[name].copy()
            tensors[name][ids] *= np.float32(gain)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return dst
