"""The fine-tuning config: a TOML file (plus ``section.key=value`` overrides) read into frozen dataclasses.

Every field has a default except the base checkpoint and the training manifest, so an experiment file only
says what differs. ``train/configs/*.toml`` are the examples; ``load_train_config`` validates and says which
field is wrong.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from qasr_jax.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What to train. ``checkpoint``: a released-layout (or Orbax) dir with config.json and tokenizer files, or a
    Hugging Face Hub model name such as "Qwen/Qwen3-ASR-0.6B" (``qasr_jax.hub``: a local path wins); ``revision``:
    the Hub branch, tag or commit of such a name ("" = main).

    init: "pretrained" loads its weights; "random" initialises from its config.json (``seed``).
    dtype: compute dtype ("float32", "bfloat16"); param_dtype: master weights (keep "float32").
    remat: "none" or "layers" (recompute each layer's activations in the backward pass).
    freeze: parts kept fixed: any of "encoder" (audio tower and projector), "decoder" (embeddings, decoder
        layers, head), "decoder_layers" (the decoder's layers and final norm, not the embeddings: a CTC-only
        stage trains the tied embeddings and leaves the unused layers as they are).
    """

    checkpoint: str = ""
    revision: str = ""
    init: str = "pretrained"
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    attention_impl: str = "auto"
    freeze: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Manifests (JSONL; relative audio paths are relative to the manifest) and batching.

    batch_size: rows per optimizer step across all processes (split into ``optim.grad_accum`` micro-batches).
    sort_window: rows are shuffled, then sorted by length within windows of this many batches, so a batch
        holds similar lengths (little padding) while the order stays random.
    token_multiple, label_multiple: sequence and target lengths are padded up to these multiples (fewer
        compiled shapes).
    """

    train_manifest: str = ""
    eval_manifest: str = ""
    batch_size: int = 8
    eval_batch_size: int = 8
    max_audio_seconds: float = 30.0
    sort_window: int = 16
    token_multiple: int = 32
    label_multiple: int = 16
    seed: int = 0
    num_threads: int = 4
    prefetch: int = 4


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then ``decay`` ("cosine", "linear" or "constant") to ``end_lr_ratio`` × peak."""

    learning_rate: float = 1e-5
    warmup_steps: int = 0
    decay: str = "cosine"
    end_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 1.0
    grad_accum: int = 1


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Perturbation of the training features (``qasr_jax.training.augment``; all 0: none). frequency_scale: each
    row's spectrum is stretched by a factor drawn log-uniformly in [1 / (1 + f), 1 + f] (voices of other
    vocal-tract lengths); freq_masks bands of up to freq_width mel bins and time_masks spans of up to time_width
    frames are set to the row's mean (SpecAugment). Evaluation and inference never augment."""

    frequency_scale: float = 0.0
    freq_masks: int = 0
    freq_width: int = 0
    time_masks: int = 0
    time_width: int = 0


@dataclasses.dataclass(frozen=True)
class AdaptersConfig:
    """LoRA fine-tuning (``qasr_jax.adapters``): with ``rank`` > 0 the base model stays frozen (no gradient, no
    optimizer state; its ``model.param_dtype``) and only low-rank adapters on the ``targets`` train (fp32).
    targets: patterns over the official model's module names (``model.layers.*.self_attn.[qkvo]_proj``; a plain
    name such as ``q_proj`` matches it in every layer of both towers). alpha: the update is scaled by
    alpha / rank. dropout: on the adapters' input. ``run.export_dir`` then receives the adapter in the PEFT
    layout; ``export_merged``: also write base + adapter there as a released-layout checkpoint. rank 0: off."""

    targets: tuple[str, ...] = ("model.layers.*.self_attn.[qkvo]_proj", "model.layers.*.mlp.*_proj")
    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    export_merged: str = ""

    @property
    def enabled(self) -> bool:
        return self.rank > 0


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The device mesh (``qasr_jax.sharding``): a spec like "data=2,fsdp=2,tensor=2" and rule overrides
    (``{ heads = "tensor", embed = "" }``, "" = replicated). ``distributed``: call
    ``jax.distributed.initialize()`` first (multi-host launches)."""

    spec: str = "data=-1"
    rules: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    distributed: bool = False


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The loop. objective: "asr" (next-token loss on the target) or "aligner" (classes at timestamp slots).

    ce_weight: the weight of the cross-entropy of the targets (per target token). 0 (ASR only) skips the
    decoder's forward pass: the encoder then learns from CTC alone.
    ctc_weight: ASR only; > 0 adds that times a CTC loss (per label) of the row's words (``ctc_text``) on the
    audio embeddings, RMS-normalised and read through the model's own head (the tied embedding;
    ``<tts_pad>``, unused in transcription, is the blank). It adds no parameters and leaves the released layout
    as it is; it teaches the encoder to spell out the speech monotonically, which a model trained from scratch
    learns far faster than through the decoder alone. It needs a trainable encoder.
    frame_weight: ASR only; > 0 adds that times a per-frame CE on the same CTC logits: on rows with word times
    (``words`` in the manifest, one per spoken word), each encoder output token's target is the label of the
    word under it, the blank between words. A dense signal from the first step, it lets the encoder leave the
    all-blank start of CTC at once.
    stop_when: "METRIC OP VALUE" (e.g. "ctc_wer <= 0.25"): the run ends (checkpoint, export) at the first
    evaluation that meets it. gates: "STEP: METRIC OP VALUE" go/no-go checks (e.g. "1000: ctc_gap_ratio >=
    0.1"), read at the first evaluation at or after STEP; a failed gate ends the run with ``GateFailed``.
    ctc_merges: > 0 spells the CTC labels with only the tokenizer's first that many BPE merges (smaller pieces,
    each still an id of the vocabulary, shared between words); 0 uses the full tokenizer.

    Steps count optimizer updates. ``eval_every``/``save_every`` 0 = never (a final checkpoint is always
    written). ``export_dir``: write the trained model in the released layout there at the end.
    """

    objective: str = "asr"
    ce_weight: float = 1.0
    ctc_weight: float = 0.0
    ctc_merges: int = 0
    frame_weight: float = 0.0
    stop_when: str = ""
    gates: tuple[str, ...] = ()
    output_dir: str = "runs/default"
    steps: int = 1000
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 500
    keep_last: int = 3
    async_checkpointing: bool = True
    progress: bool = True
    eval_max_new_tokens: int = 64
    export_dir: str = ""
    export_dtype: str = "bfloat16"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    adapters: AdaptersConfig = dataclasses.field(default_factory=AdaptersConfig)


_CHOICES = {
    ("model", "init"): ("pretrained", "random"),
    ("model", "dtype"): ("float32", "bfloat16", "float16"),
    ("model", "param_dtype"): ("float32", "bfloat16"),
    ("model", "remat"): ("none", "layers"),
    ("model", "attention_impl"): ("auto", "xla", "pallas"),
    ("optim", "decay"): ("cosine", "linear", "constant"),
    ("run", "objective"): ("asr", "aligner"),
    ("run", "export_dtype"): ("float32", "bfloat16"),
}
# Each TOML section and its dataclass: TrainConfig's fields, whose default factories are the section classes.
_SECTION_CLASSES = {f.name: f.default_factory for f in dataclasses.fields(TrainConfig)}


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """``value`` as the field type ``annotation`` (from TOML), or ConfigError naming ``where``."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {**typing.__dict__, "Mapping": Mapping, "Any": Any})
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in (part.strip() for part in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = {a for a in typing.get_args(annotation) if a is not Ellipsis}
        return tuple(_coerce(v, item, where) for v in value)
    if origin in (Mapping, dict) or annotation in (Mapping, dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return types.MappingProxyType(dict(value))
    raise AssertionError(f"unhandled config type {annotation!r}")


def config_from_dict(raw: Mapping[str, Any], source: str = "config") -> TrainConfig:
    """A validated TrainConfig from a parsed TOML document."""
    unknown = sorted(set(raw) - set(_SECTION_CLASSES))
    if unknown:
        raise ConfigError(f"{source}: unknown sections {unknown}; expected {sorted(_SECTION_CLASSES)}")
    sections = {}
    for name, cls in _SECTION_CLASSES.items():
        values = raw.get(name, {})
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: [{name}] must be a table")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        bad = sorted(set(values) - set(fields))
        if bad:
            raise ConfigError(f"{source}: unknown fields in [{name}]: {bad}; expected {sorted(fields)}")
        kw = {k: _coerce(v, fields[k].type, f"{source}: {name}.{k}") for k, v in values.items()}
        for key, choice in kw.items():
            allowed = _CHOICES.get((name, key))
            if allowed and choice not in allowed:
                raise ConfigError(f"{source}: {name}.{key} = {choice!r}; expected one of {list(allowed)}")
        sections[name] = cls(**kw)
    config = TrainConfig(**sections)
    _validate(config, source)
    return config


def _validate(c: TrainConfig, source: str) -> None:
    problems = []
    if not c.model.checkpoint:
        problems.append(
            "model.checkpoint is required (a dir with config.json and tokenizer files, or a Hub model name)"
        )
    for part in c.model.freeze:
        if part not in ("encoder", "decoder", "decoder_layers"):
            problems.append(f"model.freeze: {part!r} is not 'encoder', 'decoder' or 'decoder_layers'")
    if {"encoder", "decoder"} <= set(c.model.freeze):
        problems.append("model.freeze: freezing both the encoder and the decoder leaves nothing to train")
    if not c.data.train_manifest:
        problems.append("data.train_manifest is required")
    positive = {
        "data.batch_size": c.data.batch_size,
        "data.eval_batch_size": c.data.eval_batch_size,
        "data.sort_window": c.data.sort_window,
        "data.token_multiple": c.data.token_multiple,
        "data.label_multiple": c.data.label_multiple,
        "data.num_threads": c.data.num_threads,
        "optim.grad_accum": c.optim.grad_accum,
        "run.steps": c.run.steps,
        "run.log_every": c.run.log_every,
        "run.keep_last": c.run.keep_last,
        "run.eval_max_new_tokens": c.run.eval_max_new_tokens,
    }
    problems += [f"{name} must be positive, got {value}" for name, value in positive.items() if value <= 0]
    if c.data.max_audio_seconds <= 0:
        problems.append("data.max_audio_seconds must be positive")
    if c.run.ctc_weight < 0 or (c.run.ctc_weight > 0 and c.run.objective != "asr"):
        problems.append("run.ctc_weight must be >= 0, and 0 unless run.objective is 'asr'")
    if c.run.ce_weight < 0 or (c.run.ce_weight == 0 and c.run.objective != "asr"):
        problems.append("run.ce_weight must be >= 0, and positive unless run.objective is 'asr'")
    if c.run.frame_weight < 0 or (c.run.frame_weight > 0 and c.run.objective != "asr"):
        problems.append("run.frame_weight must be >= 0, and 0 unless run.objective is 'asr'")
    if c.run.ce_weight == 0 and c.run.ctc_weight == 0 and c.run.frame_weight == 0:
        problems.append("run.ce_weight and run.ctc_weight are both 0: there is nothing to learn")
    a = c.augment
    if not 0 <= a.frequency_scale <= 1:
        problems.append(f"augment.frequency_scale must be in [0, 1], got {a.frequency_scale}")
    for name in ("freq_masks", "freq_width", "time_masks", "time_width"):
        if getattr(a, name) < 0:
            problems.append(f"augment.{name} must be >= 0, got {getattr(a, name)}")
    if c.run.ctc_weight > 0 and "encoder" in c.model.freeze:
        problems.append(
            "run.ctc_weight > 0 with model.freeze = ['encoder']: CTC would only move the tied embeddings; "
            "set run.ctc_weight = 0 to train the decoder on a frozen encoder"
        )
    if c.run.ce_weight == 0 and "encoder" in c.model.freeze:
        problems.append("run.ce_weight = 0 with a frozen encoder leaves nothing to train")
    for text in ([c.run.stop_when] if c.run.stop_when else []) + list(c.run.gates):
        try:
            parse_condition(text, gate=text in c.run.gates)
        except ValueError as error:
            problems.append(str(error))
    if (c.run.stop_when or c.run.gates) and not (c.data.eval_manifest and c.run.eval_every):
        problems.append("run.stop_when and run.gates need data.eval_manifest and run.eval_every")
    if c.optim.learning_rate <= 0:
        problems.append("optim.learning_rate must be positive")
    if c.data.batch_size % c.optim.grad_accum:
        problems.append(
            f"data.batch_size ({c.data.batch_size}) must be a multiple of optim.grad_accum ({c.optim.grad_accum})"
        )
    if not 0 <= c.optim.end_lr_ratio <= 1:
        problems.append("optim.end_lr_ratio must be in [0, 1]")
    if c.optim.warmup_steps < 0 or c.run.eval_every < 0 or c.run.save_every < 0 or c.data.prefetch < 0:
        problems.append("warmup_steps, eval_every, save_every and prefetch must be >= 0")
    problems += _adapter_problems(c.adapters, c.model)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


def _adapter_problems(a: AdaptersConfig, model: ModelConfig) -> list[str]:
    if not a.enabled:
        changed = [f.name for f in dataclasses.fields(a) if getattr(a, f.name) != f.default and f.name != "rank"]
        if a.rank < 0 or changed:
            return [f"adapters.rank must be a positive number to train adapters (got {a.rank}; set: {changed})"]
        return []
    problems = []
    if not a.targets:
        problems.append("adapters.targets is empty")
    if not a.alpha > 0:
        problems.append(f"adapters.alpha must be positive, got {a.alpha}")
    if not 0 <= a.dropout < 1:
        problems.append(f"adapters.dropout must be in [0, 1), got {a.dropout}")
    if model.freeze:
        problems.append("model.freeze does not apply with adapters (the whole base model is frozen)")
    return problems


_OPERATORS = {"<=": float.__le__, "<": float.__lt__, ">=": float.__ge__, ">": float.__gt__}


@dataclasses.dataclass(frozen=True)
class Condition:
    """``metric op value`` on evaluation metrics, from ``step`` on (gates; 0 for stop_when)."""

    text: str
    metric: str
    op: str
    value: float
    step: int = 0

    def holds(self, metrics: Mapping[str, float]) -> bool | None:
        """Whether ``metrics`` meet it; None when the metric is not among them."""
        if self.metric not in metrics:
            return None
        return bool(_OPERATORS[self.op](float(metrics[self.metric]), self.value))


def parse_condition(text: str, gate: bool = False) -> Condition:
    """A ``run.stop_when`` ("ctc_wer <= 0.25") or ``run.gates`` ("1000: ctc_gap_ratio >= 0.1") entry."""
    what = "run.gates" if gate else "run.stop_when"
    step, body = 0, text
    if gate:
        head, sep, body = text.partition(":")
        if not sep or not head.strip().isdigit():
            raise ValueError(f"{what}: {text!r} is not 'STEP: METRIC OP VALUE'")
        step = int(head)
    parts = body.split()
    if len(parts) != 3 or parts[1] not in _OPERATORS:
        raise ValueError(f"{what}: {text!r} is not 'METRIC OP VALUE' with OP one of {', '.join(_OPERATORS)}")
    try:
        value = float(parts[2])
    except ValueError:
        raise ValueError(f"{what}: {text!r}: {parts[2]!r} is not a number") from None
    return Condition(text, parts[0], parts[1], value, step)


def _parse_value(text: str) -> Any:
    """A command-line override value: TOML syntax when it parses (numbers, true, [lists], "strings"), else text."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``raw`` with ``section.key=value`` overrides applied (``mesh.rules.heads=tensor`` reaches into tables)."""
    out: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ConfigError(f"override {item!r}: expected section.key=value")
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = dict(child) if isinstance(child, Mapping) else {}
                node[part] = child
            node = child
        node[parts[-1]] = _parse_value(value.strip())
    return out


def load_train_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a TOML config (or start from defaults with ``path=None``) and apply ``section.key=value`` overrides.

    Relative paths in ``model.checkpoint`` and the manifests are taken relative to the current directory.
    """
    raw: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        source = os.fspath(path)
        try:
            with open(source, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError as e:
            raise ConfigError(f"{source}: no such config file") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{source}: not valid TOML ({e})") from e
    return config_from_dict(apply_overrides(raw, overrides), source)


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """The config as plain data (for logs and the run directory)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return plain(config)


__all__ = [
    "AdaptersConfig",
    "AugmentConfig",
    "DataConfig",
    "MeshConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_train_config",
]
