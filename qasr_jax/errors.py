"""Typed errors. Each names the input it is about and what is wrong with it."""

from __future__ import annotations


class QasrError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(QasrError, ValueError):
    """A config.json is missing a field or holds values that do not fit together."""


class CheckpointError(QasrError, ValueError):
    """Weights that cannot be loaded: missing, unexpected or mis-shaped tensors, unknown layouts."""


class ModelNotFoundError(CheckpointError, FileNotFoundError):
    """A model that is neither a local path nor a Hugging Face Hub repo that can be had: a missing path that is
    not a repo id, a repo or revision the Hub does not have (or that needs a login), or one missing from the hub
    cache while offline. ``model`` and ``revision`` are what was asked for."""

    def __init__(self, message: str, model: str = "", revision: str | None = None) -> None:
        super().__init__(message)
        self.model = model
        self.revision = revision


class UnsafeCheckpointError(CheckpointError):
    """A pickle-based weight file (.bin/.pt/.pth/.ckpt); only safetensors and Orbax are read."""


class AudioError(QasrError, ValueError):
    """Audio input that cannot be used."""


class AudioFileNotFoundError(AudioError, FileNotFoundError):
    """An audio path that does not exist."""


class AudioDecodeError(AudioError):
    """A file or byte string that is not decodable audio (unreadable, not audio, truncated)."""


class AudioTooLongError(AudioError):
    """The audio is longer than the configured limit."""


class EmptyAudioError(AudioError):
    """Audio with no samples."""


class InvalidAudioError(AudioError):
    """Samples or a sample rate that are not valid audio (NaN/Inf, wrong rank, rate <= 0)."""


class TokenizerError(QasrError, ValueError):
    """Tokenizer files that are missing or inconsistent."""


class LanguageError(QasrError, ValueError):
    """A language name that the model does not support."""


class AlignmentError(QasrError, ValueError):
    """An (audio, text) pair that cannot be aligned."""


class MissingExtraError(QasrError, ImportError):
    """An optional dependency (a pip extra such as ``qasr-jax[ja]``) that a requested feature needs."""


class PromptError(QasrError, ValueError):
    """Prompt text that would corrupt the model input (e.g. a context holding an audio placeholder)."""


class AdapterError(QasrError, ValueError):
    """Adapter weights or settings that do not fit the model: unknown projections, a rank that disagrees with
    its config, shapes of another base model, features this package does not compute."""


class UnknownAdapterError(AdapterError):
    """A request names an adapter that is not loaded."""
