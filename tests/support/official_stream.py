"""The official streaming algorithm with its vLLM generation call served by the official transformers model.

``qwen_asr.Qwen3ASRModel.streaming_transcribe`` runs only with the vLLM backend: it calls
``self.model.generate([{"prompt": text, "multi_modal_data": {"audio": [wav]}}], sampling_params=...)`` and reads
``outputs[0].outputs[0].text``. ``official_streamer`` builds the official object with that call answered by the
official transformers-backend model: the processor on the same prompt string and audio, greedy ``generate``
(encoder attention windows wired in), the new tokens decoded without special tokens. Every other step —
buffering, chunking, prefix rollback, parsing — is the official code's own. Each call is recorded.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from tests.support import official


@dataclasses.dataclass
class GenerateCall:
    """One generation request of the official streaming code: its prompt string, audio and decoded output."""

    prompt: str
    samples: int
    text: str


@dataclasses.dataclass
class _Completion:
    text: str


@dataclasses.dataclass
class _RequestOutput:
    outputs: list[_Completion]


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
            new = out.sequences[:, batch["input_ids"].shape[1] :]
            text = self.processor.batch_decode(
                new, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )[0]
            self.calls.append(GenerateCall(item["prompt"], len(wav), text))
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
