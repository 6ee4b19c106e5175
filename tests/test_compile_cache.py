"""JAX's persistent compilation cache: on by default under the user's cache dir, moved by the environment
variable or the option, off on request; a second run of the same command compiles nothing new."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.speech import synth_wav

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint() -> str:
    from tests.test_asr import cached_small_checkpoint

    return cached_small_checkpoint()


def transcribe(checkpoint: str, env_changes: dict[str, str | None], *options: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "QASR_COMPILATION_CACHE"}
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    result = subprocess.run(
        [sys.executable, "-m", "infer", "transcribe", synth_wav("Compile once."), "--model", checkpoint,
         "--max-new-tokens", "4", "--language", "English", "--no-progress", *options],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def entries(directory: Path) -> set[str]:
    return (
        {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}
        if directory.exists()
        else set()
    )


def test_cache_is_on_by_default_and_a_second_run_compiles_nothing_new(checkpoint, tmp_path):
    home = tmp_path / "xdg"
    first_out = transcribe(checkpoint, {"XDG_CACHE_HOME": str(home)})
    cache = home / "qasr-jax" / "xla"
    first = entries(cache)
    assert len(first) >= 3  # the prefill, the decode loop and the state programs at least
    second_out = transcribe(checkpoint, {"XDG_CACHE_HOME": str(home)})
    assert entries(cache) == first  # every program was found in the cache
    assert second_out == first_out


def test_cache_moves_with_the_environment_variable_and_the_option_and_turns_off(checkpoint, tmp_path):
    home = tmp_path / "xdg"
    moved = tmp_path / "moved"
    transcribe(checkpoint, {"XDG_CACHE_HOME": str(home), "QASR_COMPILATION_CACHE": str(moved)})
    assert entries(moved) and not (home / "qasr-jax").exists()
    option_dir = tmp_path / "option"
    transcribe(checkpoint, {"XDG_CACHE_HOME": str(home), "QASR_COMPILATION_CACHE": str(moved)},
               "--compilation-cache", str(option_dir))  # fmt: skip
    assert entries(option_dir) and not (home / "qasr-jax").exists()
    transcribe(checkpoint, {"XDG_CACHE_HOME": str(home)}, "--compilation-cache", "off")
    transcribe(checkpoint, {"XDG_CACHE_HOME": str(home), "QASR_COMPILATION_CACHE": "off"})
    assert not (home / "qasr-jax").exists()


def test_settings_resolve_as_documented(monkeypatch, tmp_path):
    from qasr_jax import compile_cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("QASR_COMPILATION_CACHE", raising=False)
    assert compile_cache.resolve() == str(tmp_path / "qasr-jax" / "xla")
    assert compile_cache.resolve(True) == str(tmp_path / "qasr-jax" / "xla")
    for off in (False, "off", "0", "false", "no", ""):
        assert compile_cache.resolve(off) is None
    assert compile_cache.resolve(tmp_path / "x") == str(tmp_path / "x")
    monkeypatch.setenv("QASR_COMPILATION_CACHE", "off")
    assert compile_cache.resolve() is None
    monkeypatch.setenv("QASR_COMPILATION_CACHE", str(tmp_path / "env"))
    assert compile_cache.resolve() == str(tmp_path / "env")


def test_training_keeps_its_programs_and_a_repeated_run_compiles_nothing_new(tmp_path):
    from tests.support import train_fixtures as tf

    model_dir = tf.write_model_dir(tmp_path / "model", tf.tiny_config_dict())
    manifest = tf.write_manifest(tmp_path / "train.jsonl", tf.speech_rows()[:4])
    home = tmp_path / "xdg"
    env = {k: v for k, v in os.environ.items() if k not in ("QASR_COMPILATION_CACHE", "XLA_FLAGS")}
    env["XDG_CACHE_HOME"] = str(home)

    def train(name: str) -> None:
        config = tmp_path / f"{name}.toml"
        config.write_text(tf.train_toml(model_dir, manifest, str(tmp_path / name),
                                        {"run": {"steps": 1, "save_every": 1}}), encoding="utf-8")  # fmt: skip
        done = subprocess.run([sys.executable, "-m", "train", "--config", str(config)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]

    cache = home / "qasr-jax" / "xla"
    train("first")
    first = entries(cache)
    assert len(first) >= 1  # the train step at least
    train("second")  # a fresh run of the same config: every program is found in the cache
    assert entries(cache) == first
