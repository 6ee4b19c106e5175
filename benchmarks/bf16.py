"""bf16 fidelity: ours and the official model, each in bf16 and fp32, on the same checkpoint and speech.

    python -m benchmarks.bf16 [--model asr-0.6b] [--clips 8] [--steps 64] [--workdir /tmp/qasr_bench]

Builds (once, cached under --workdir) a random-weight checkpoint at the released config with the official code,
its weights scaled so that every part of the model matters (tests/support/official.py), and synthesises
``--clips`` espeak-ng utterances (0.7–19 s, several voices). Four variants run on every clip: the official
``qwen-asr`` model (transformers backend, its encoder's attention windows wired in, as it is served) and ours,
each with params and compute in fp32 and in bf16. Each side runs in its own subprocess.

- greedy tokens: ``--steps`` new tokens per clip from the prompt of the chat template, end tokens suppressed
  (ours through the engine, from the waveform; official through its ``generate``, from its processor's
  features, cast to the model's dtype as its pipeline does);
- logits: one forward pass over the prompt followed by the official fp32 model's greedy tokens (the same
  sequence for every variant, features from the official processor), at the ``--steps`` positions that predict
  those tokens.

Printed, for each pair (A, B), over all clips: the largest and the mean |A − B| of the logits relative to the
std of B's logits (per clip; max over clips of the max, mean over clips of the max, mean over clips of the
mean), how often their argmaxes agree on the shared sequence, and how far their own greedy tokens agree (the share of equal tokens, and the mean
length of the common prefix as a share of ``--steps``). Needs the test extra (torch, transformers, qwen-asr)
and espeak-ng.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks import common
from benchmarks.common import EOS_TOKEN_IDS, SAMPLE_RATE

DTYPES = ("float32", "bfloat16")

# (text, espeak-ng voice): about 0.7, 5, 19, 3, 4, 6, 9 and 12 s; clips over 8 s span several encoder windows.
UTTERANCES: tuple[tuple[str, str], ...] = (
    ("Hi.", "en"),
    ("The quick brown fox jumps over the lazy dog near the quiet river bank today.", "en"),
    (
        "Speech recognition turns spoken language into written text. Modern systems listen to an audio "
        "signal, split it into short frames, and predict the words one token at a time. They are trained "
        "on many thousands of hours of recordings in dozens of languages, and they can follow accents, "
        "noise and fast talkers surprisingly well.",
        "en",
    ),
    ("今天天气很好，我们一起去公园散步吧。", "cmn"),
    ("Guten Morgen, wie geht es Ihnen heute?", "de"),
    ("Le train de huit heures part du quai numéro trois dans cinq minutes.", "fr-fr"),
    (
        "Please remember to bring your passport, your boarding pass and a bottle of water to the gate "
        "before nine thirty.",
        "en-us",
    ),
    (
        "The committee met on Tuesday to review the budget. After a long discussion, they agreed to fund "
        "the new library, repair the old bridge and plant two hundred trees along the main road.",
        "en-gb",
    ),
)


@dataclasses.dataclass(frozen=True)
class Spread:
    """How far logits A are from logits B, relative to B's spread, and how often their argmaxes agree."""

    max_rel: float  # max over clips of max|A − B| / std(B)
    clip_max_rel: float  # mean over clips of max|A − B| / std(B): the typical worst logit of a clip
    mean_rel: float  # mean over clips of mean|A − B| / std(B)
    argmax_agreement: float  # share of positions whose argmax is the same


@dataclasses.dataclass(frozen=True)
class Agreement:
    """How far two greedy decodings of the same clips agree."""

    token_share: float  # share of equal tokens, position by position
    prefix_share: float  # mean length of the common prefix, as a share of the steps
    identical: int  # clips whose tokens are all equal
    clips: int


def logit_spread(ours: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> Spread:
    """``Spread`` of per-clip logits ``[positions, vocab]`` against the reference's (same shapes)."""
    max_rel, mean_rel, agree, total = [], [], 0, 0
    for a, b in zip(ours, reference, strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        diff, std = np.abs(a - b), float(np.std(b))
        max_rel.append(float(diff.max()) / std)
        mean_rel.append(float(diff.mean()) / std)
        agree += int(np.sum(a.argmax(-1) == b.argmax(-1)))
        total += a.shape[0]
    return Spread(max(max_rel), float(np.mean(max_rel)), float(np.mean(mean_rel)), agree / total)


def token_agreement(ours: np.ndarray, reference: np.ndarray) -> Agreement:
    """``Agreement`` of greedy tokens ``[clips, steps]``."""
    ours, reference = np.asarray(ours), np.asarray(reference)
    equal = ours == reference
    steps = equal.shape[1]
    prefix = [int(np.argmin(row)) if not row.all() else steps for row in equal]
    return Agreement(
        float(equal.mean()), float(np.mean(prefix)) / steps, int(equal.all(axis=1).sum()), len(equal)
    )


# ----------------------------------------------------------------------------------------------------------------
# Inputs


@dataclasses.dataclass
class Inputs:
    """What every variant sees: waveforms, official features, prompt ids, and the shared token sequences."""

    waves: list[np.ndarray]
    features: list[np.ndarray]  # [128, frames] float32, the official processor's
    prompts: list[list[int]]
    reference_tokens: np.ndarray | None = None  # [clips, steps] the official fp32 greedy tokens

    def save(self, path: str) -> None:
        arrays: dict[str, Any] = {}
        for i, (wave, feats) in enumerate(zip(self.waves, self.features)):
            arrays[f"wave{i}"], arrays[f"features{i}"] = wave, feats
            arrays[f"prompt{i}"] = np.asarray(self.prompts[i], np.int64)
        if self.reference_tokens is not None:
            arrays["reference_tokens"] = self.reference_tokens
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: str) -> Inputs:
        with np.load(path) as data:
            n = sum(1 for key in data.files if key.startswith("wave"))
            return cls(
                [data[f"wave{i}"] for i in range(n)],
                [data[f"features{i}"] for i in range(n)],
                [data[f"prompt{i}"].tolist() for i in range(n)],
                data["reference_tokens"] if "reference_tokens" in data.files else None,
            )

    def sequences(self) -> list[list[int]]:
        """Prompt + reference tokens of every clip (the teacher-forced sequences)."""
        assert self.reference_tokens is not None
        return [p + t.tolist() for p, t in zip(self.prompts, self.reference_tokens)]


def make_inputs(checkpoint: str, utterances: Sequence[tuple[str, str]]) -> Inputs:
    """Speech, the official processor's features and the chat-template prompt of every utterance."""
    from qasr_jax import text as text_io
    from qasr_jax.config import load_config

    official, speech = common.official, common.speech
    config = load_config(checkpoint)
    tokenizer = text_io.Tokenizer.from_pretrained(checkpoint)
    waves = [speech.synth(sentence, voice=voice) for sentence, voice in utterances]
    features = [feats for feats, _ in official.official_features(waves, checkpoint)]
    prompts = [text_io.build_prompt_ids(tokenizer, config.audio.output_length(f.shape[1])) for f in features]
    return Inputs(waves, features, prompts)


# ----------------------------------------------------------------------------------------------------------------
# The two sides (each run in its own process)


def run_official(
    checkpoint: str, inputs: Inputs, dtype: str, steps: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The official model in ``dtype``, windows wired in: greedy tokens ``[clips, steps]`` and logits ``[steps,
    vocab]`` per clip at the positions that predict the reference tokens (its own when the inputs carry none)."""
    import torch
    from qwen_asr.core.transformers_backend import Qwen3ASRForConditionalGeneration

    official = common.official
    torch.set_num_threads(os.cpu_count() or 1)
    torch_dtype = getattr(torch, dtype)
    model = Qwen3ASRForConditionalGeneration.from_pretrained(checkpoint, dtype=torch_dtype).eval()
    thinker = model.thinker
    tokens, logits = [], []
    with official.official_encoder_windows(), torch.no_grad():
        for i, (feats, prompt) in enumerate(zip(inputs.features, inputs.prompts)):
            features = torch.from_numpy(feats[None]).to(torch_dtype)
            feature_mask = torch.ones((1, feats.shape[1]), dtype=torch.long)
            ids = torch.tensor([prompt])
            thinker.rope_deltas = None
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), input_features=features,
                feature_attention_mask=feature_mask, max_new_tokens=steps, min_new_tokens=steps,
                do_sample=False, suppress_tokens=list(EOS_TOKEN_IDS),
            )  # fmt: skip
            tokens.append(out.sequences[0, len(prompt) :].numpy())
            reference = tokens[-1] if inputs.reference_tokens is None else inputs.reference_tokens[i]
            seq = torch.tensor([prompt + reference.tolist()])
            thinker.rope_deltas = None
            full = thinker(
                input_ids=seq, attention_mask=torch.ones_like(seq), input_features=features,
                feature_attention_mask=feature_mask, use_cache=False,
            ).logits  # fmt: skip
            logits.append(full[0, len(prompt) - 1 : len(prompt) - 1 + steps].to(torch.float32).numpy())
    return np.stack(tokens), logits


def run_ours(
    checkpoint: str, inputs: Inputs, dtype: str, steps: int, generate: bool = True
) -> tuple[np.ndarray | None, list[np.ndarray]]:
    """Ours in ``dtype``: greedy tokens through the engine (all clips in one batch, from the waveforms; None
    without ``generate``) and logits ``[steps, vocab]`` per clip from one forward pass over the reference
    sequence (official features)."""
    import jax
    import jax.numpy as jnp

    from qasr_jax import load_pretrained
    from qasr_jax.engine import DecodeOptions, DecodeRequest, Engine
    from qasr_jax.model import Qwen3ASR

    compute = jnp.dtype(dtype)
    config, params = load_pretrained(checkpoint, dtype=compute)
    tokens = None
    if generate:
        engine = Engine(config, dtype=compute, attention_impl="xla",
                        options=DecodeOptions(suppress_token_ids=EOS_TOKEN_IDS))  # fmt: skip
        requests = [DecodeRequest(w, p, steps) for w, p in zip(inputs.waves, inputs.prompts)]
        tokens = np.stack([np.asarray(g.token_ids[:steps]) for g in engine.run(params, requests)])

    logits: list[np.ndarray] = []
    if inputs.reference_tokens is not None:  # always, after the official side ran
        # One shape for every clip (left-padded sequence, zero-padded features), so one compiled program.
        sequences = inputs.sequences()
        length = max(len(s) for s in sequences)
        frames = max(f.shape[1] for f in inputs.features)
        model = Qwen3ASR(config, dtype=compute, param_dtype=compute, attention_impl="xla")
        forward = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
        for seq, feats, prompt in zip(sequences, inputs.features, inputs.prompts):
            ids = np.zeros((1, length), np.int32)
            mask = np.zeros((1, length), np.int32)
            ids[0, length - len(seq) :], mask[0, length - len(seq) :] = seq, 1
            padded = np.zeros((1, feats.shape[0], frames), np.float32)
            padded[0, :, : feats.shape[1]] = feats
            feature_mask = (np.arange(frames) < feats.shape[1]).astype(np.int32)[None]
            full = forward(params, ids, mask, padded, feature_mask)
            start = length - len(seq) + len(prompt) - 1
            logits.append(np.asarray(full[0, start : start + steps], np.float32))
    return tokens, logits


def worker(side: str, checkpoint: str, inputs_path: str, steps: int, out_dir: str) -> None:
    """Both dtypes of one side; tokens and logits saved as ``{side}_{dtype}_tokens.npy`` / ``_logits.npy``."""
    inputs = Inputs.load(inputs_path)
    run = run_official if side == "official" else run_ours
    for dtype in DTYPES:
        started = time.perf_counter()
        tokens, logits = run(checkpoint, inputs, dtype, steps)
        np.save(os.path.join(out_dir, f"{side}_{dtype}_tokens.npy"), tokens)
        np.save(os.path.join(out_dir, f"{side}_{dtype}_logits.npy"), np.stack(logits))
        print(f"{side} {dtype}: {time.perf_counter() - started:.0f} s (load {os.getloadavg()[0]:.2f})",
              file=sys.stderr, flush=True)  # fmt: skip
        if inputs.reference_tokens is None:
            # The official fp32 tokens (the first run) are the sequence every variant's logits are taken on.
            inputs.reference_tokens = tokens
            inputs.save(inputs_path)


# ----------------------------------------------------------------------------------------------------------------
# The report

PAIRS = (
    ("ours bf16", "official bf16"),
    ("ours bf16", "ours fp32"),
    ("official bf16", "official fp32"),
    ("ours bf16", "official fp32"),
    ("ours fp32", "official fp32"),
)
_FILES = {"ours bf16": "ours_bfloat16", "ours fp32": "ours_float32",
          "official bf16": "official_bfloat16", "official fp32": "official_float32"}  # fmt: skip


def measure(out_dir: str) -> list[dict[str, Any]]:
    """One row per pair of ``PAIRS`` from the saved tokens and logits."""
    rows = []
    for a, b in PAIRS:
        logits_a = np.load(os.path.join(out_dir, f"{_FILES[a]}_logits.npy"), mmap_mode="r")
        logits_b = np.load(os.path.join(out_dir, f"{_FILES[b]}_logits.npy"), mmap_mode="r")
        tokens_a = np.load(os.path.join(out_dir, f"{_FILES[a]}_tokens.npy"))
        tokens_b = np.load(os.path.join(out_dir, f"{_FILES[b]}_tokens.npy"))
        rows.append({"a": a, "b": b, **dataclasses.asdict(logit_spread(logits_a, logits_b)),
                     **dataclasses.asdict(token_agreement(tokens_a, tokens_b))})  # fmt: skip
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| A vs B | max\\|Δ\\|/std | clip max\\|Δ\\|/std | mean\\|Δ\\|/std | argmax agree | greedy tokens equal "
        "| common prefix | identical clips |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['a']} vs {r['b']} | {r['max_rel']:.3g} | {r['clip_max_rel']:.3g} | {r['mean_rel']:.3g} | "
                     f"{100 * r['argmax_agreement']:.1f}% | {100 * r['token_share']:.1f}% | "
                     f"{100 * r['prefix_share']:.1f}% | {r['identical']}/{r['clips']} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser("benchmarks.bf16", __doc__)
    common.add_checkpoint_arguments(parser)
    parser.add_argument("--clips", type=int, default=len(UTTERANCES), help="clips (at most %(default)s)")
    parser.add_argument("--steps", type=int, default=64, help="greedy steps per clip (default %(default)s)")
    parser.add_argument("--out", metavar="DIR", help="keep tokens, logits and the report here")
    parser.add_argument("--worker", choices=("ours", "official"), help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.checkpoint, args.inputs, args.steps, args.out)
        return 0

    checkpoint = common.checkpoint_dir(args)
    out_dir = args.out or tempfile.mkdtemp(prefix="qasr_bf16_")
    os.makedirs(out_dir, exist_ok=True)
    inputs_path = os.path.join(out_dir, "inputs.npz")
    inputs = make_inputs(checkpoint, UTTERANCES[: args.clips])
    inputs.save(inputs_path)
    seconds = [len(w) / SAMPLE_RATE for w in inputs.waves]
    loads = [os.getloadavg()]
    for side in ("official", "ours"):  # official first: its fp32 tokens are the shared sequence
        common.run_module("benchmarks.bf16", "--worker", side, "--checkpoint", checkpoint, "--inputs", inputs_path,
                          "--steps", str(args.steps), "--out", out_dir)  # fmt: skip
        loads.append(os.getloadavg())
    rows = measure(out_dir)
    report = (
        f"{os.path.basename(os.path.normpath(checkpoint))}, random weights whose weights matter, {len(seconds)} espeak-ng clips "
        f"({min(seconds):.1f}–{max(seconds):.1f} s), {args.steps} greedy steps (end tokens suppressed), CPU\n\n"
        f"{table(rows)}\n\nload average (1, 5, 15 min): "
        + "; ".join(f"{a:.2f}, {b:.2f}, {c:.2f}" for a, b, c in loads)
        + " (start; after the official side; after ours)"
    )
    print(report)
    with open(os.path.join(out_dir, "bf16_report.json"), "w", encoding="utf-8") as f:
        json.dump(
            {"rows": rows, "clip_seconds": seconds, "steps": args.steps, "load_average": loads}, f, indent=2
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
