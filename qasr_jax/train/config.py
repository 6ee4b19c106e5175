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
    """What to train. ``checkpoint``: a released-layout (or Orbax) dir with config.json and tokenizer files.

    init: "pretrained" loads its weights; "random" initialises from its config.json (``seed``).
    dtype: compute dtype ("float32", "bfloat16"); param_dtype: master weights (keep "float32").
    remat: "none" or "layers" (recompute each layer's activations in the backward pass).
    freeze: parts kept fixed: any of "encoder" (audio tower and projector), "decoder" (embeddings, decoder
        layers, head).
    """

    checkpoint: str = ""
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

    ctc_weight: ASR only; > 0 adds that times a CTC loss of the transcript's tokens on the audio embeddings read
    through the model's own head (the tied embedding; ``<tts_pad>``, unused in transcription, is the blank). It
    adds no parameters and leaves the released layout as it is; it teaches the encoder to spell out the speech
    monotonically, which a model trained from scratch learns far faster than through the decoder alone.

    Steps count optimizer updates. ``eval_every``/``save_every`` 0 = never (a final checkpoint is always
    written). ``export_dir``: write the trained model in the released layout there at the end.
    """

    objective: str = "asr"
    ctc_weight: float = 0.0
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

    def replace(self, **sections: Any) -> TrainConfig:
        return dataclasses.replace(self, **sections)


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
_SECTION_CLASSES = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "mesh": MeshConfig,
    "run": RunConfig,
}


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
        problems.append("model.checkpoint is required (a dir with config.json and tokenizer files)")
    for part in c.model.freeze:
        if part not in ("encoder", "decoder"):
            problems.append(f"model.freeze: {part!r} is not 'encoder' or 'decoder'")
    if set(c.model.freeze) == {"encoder", "decoder"}:
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
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


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
