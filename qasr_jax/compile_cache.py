"""JAX's persistent compilation cache, on by default, so that a machine compiles each program once.

``enable(setting)`` is called by ``Qwen3ASRModel.from_pretrained``, ``Qwen3ForcedAligner.from_pretrained`` and
the command-line programs before anything is compiled. ``setting``:

- ``None`` (default): the ``QASR_COMPILATION_CACHE`` environment variable if it is set, else
  ``$XDG_CACHE_HOME/qasr-jax/xla`` (``~/.cache/qasr-jax/xla``);
- a path: that directory;
- ``False`` or one of ``"off"``, ``"0"``, ``"false"``, ``"no"``, ``""`` (also as the environment variable): off.

A cache directory the user already gave JAX (``jax.config.update("jax_compilation_cache_dir", ...)``) is kept
unless a path is passed explicitly. JAX reads the directory when it first compiles, so the first setting of a
process is the one that holds.
"""

from __future__ import annotations

import os

import jax

ENV = "QASR_COMPILATION_CACHE"
_OFF = {"", "0", "off", "false", "no", "none"}


def user_cache_dir(name: str) -> str:
    """``$XDG_CACHE_HOME/qasr-jax/NAME`` (``~/.cache/qasr-jax/NAME``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qasr-jax", name)


def default_dir() -> str:
    return user_cache_dir("xla")


def resolve_setting(setting: str | os.PathLike | bool | None, env: str, name: str) -> str | None:
    """The directory a cache setting stands for, or None when that cache is off: ``None`` → the environment
    variable ``env`` if set, else ``user_cache_dir(name)``; ``True`` → the latter; ``False`` or one of
    "off"/"0"/"false"/"no"/"none"/"" → off; a path → that directory."""
    if setting is None:
        setting = os.environ.get(env, True)
    if setting is True:
        return user_cache_dir(name)
    if setting is False or (isinstance(setting, str) and setting.strip().lower() in _OFF):
        return None
    return os.path.abspath(os.path.expanduser(os.fspath(setting)))


def resolve(setting: str | os.PathLike | bool | None = None) -> str | None:
    """The compilation cache directory ``setting`` stands for, or None when the cache is off."""
    return resolve_setting(setting, ENV, "xla")


_explicit: list[str | None] = []  # the first explicit setting of this process (an aligner loaded by the ASR
# model's from_pretrained, with no setting of its own, follows it instead of the default)


def enable(setting: str | os.PathLike | bool | None = None) -> str | None:
    """Turn the persistent cache on at the directory ``setting`` stands for; returns it (None: off)."""
    if setting is None and _explicit:
        return _explicit[0]
    path = resolve(setting)
    if setting is not None and not _explicit:
        _explicit.append(path)
    configured = jax.config.jax_compilation_cache_dir
    if path is None:
        return None
    if configured and setting is None:
        return configured
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    # Every program is worth keeping: the small ones add up on CPU, and the cache key covers shapes and flags.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


__all__ = ["ENV", "default_dir", "enable", "resolve", "resolve_setting", "user_cache_dir"]
