"""Exit codes and messages of the programs when something fails, each program run as a subprocess.

The contract (the programs' ``--help``): 0 when everything ran, 1 when an input or the model failed (the error
names it on stderr, and the inputs that could run still ran), 2 for bad arguments, which are refused before any
model is loaded. Never a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile
from safetensors.numpy import load_file, save_file

from tests.support import speech
from tests.test_asr import cached_small_checkpoint

REPO = Path(__file__).resolve().parent.parent


def run(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def assert_clean_error(result: subprocess.CompletedProcess, code: int, *named: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for text in named:
        assert text in result.stderr, (text, result.stderr[-3000:])


def test_infer_stream_bad_arguments_exit_2_and_a_failed_stream_exits_1_after_the_others(tmp_path) -> None:
    missing_model = str(tmp_path / "no-model")
    assert_clean_error(run("infer", "stream", "a.wav", "--chunk-seconds", "0", "--model", missing_model), 2,
                       "--chunk-seconds")  # fmt: skip
    assert_clean_error(run("infer", "stream", "-", "-", "--model", missing_model), 2, "stdin")
    # An unsupported language is a bad argument too, refused before the model is looked for.
    assert_clean_error(run("infer", "stream", "a.wav", "--language", "Klingon", "--model", missing_model), 2,
                       "Klingon")  # fmt: skip
    assert_clean_error(run("infer", "stream", "a.wav", "--model", missing_model), 1, "error:", "no-model")

    good = tmp_path / "hi.wav"
    soundfile.write(good, speech.synth(speech.SHORT_EN), 16000)
    (tmp_path / "notes.wav").write_text("not audio")
    missing, not_audio = str(tmp_path / "gone.wav"), str(tmp_path / "notes.wav")
    result = run("infer", "stream", missing, str(good), not_audio, "--model", cached_small_checkpoint(),
                 "--max-new-tokens", "2", "--format", "jsonl")  # fmt: skip
    assert_clean_error(result, 1, f"error: {missing}:", f"error: {not_audio}:")
    events = [json.loads(line) for line in result.stdout.splitlines()]
    # The good file between the two bad ones streamed to its final event; the bad ones wrote nothing.
    assert {e["stream"] for e in events} == {str(good)}
    assert events[-1]["final"] is True and sum(e["final"] for e in events) == 1


def test_transcribe_unreadable_manifest_exits_1_naming_it(tmp_path) -> None:
    missing_model = str(tmp_path / "no-model")
    folder = tmp_path / "a-folder"
    folder.mkdir()
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"id": "a", "path": "a.wav"}\n{"id": "b", "path": \n', encoding="utf-8")
    not_utf8 = tmp_path / "latin1.txt"
    not_utf8.write_bytes("caf\xe9.wav\n".encode("latin-1"))
    cases = [
        (tmp_path / "absent.jsonl", "absent.jsonl: No such file"),
        (folder, "a-folder: Is a directory"),
        (bad_json, "bad.jsonl:2"),
        (not_utf8, "latin1.txt: not UTF-8"),
    ]
    for manifest, named in cases:
        result = run("infer", "transcribe", "--manifest", str(manifest), "--model", missing_model)
        assert_clean_error(result, 1, "error:", named)
        assert "cannot load the model" not in result.stderr  # refused before the model is looked for
    assert not list(tmp_path.glob("*.results.jsonl"))


def test_bad_mesh_exits_2_before_any_model_is_loaded(tmp_path) -> None:
    audio = tmp_path / "hi.wav"
    soundfile.write(audio, np.zeros(16000, np.float32), 16000)
    manifest = tmp_path / "job.txt"
    manifest.write_text("hi.wav\n", encoding="utf-8")
    missing_model = str(tmp_path / "no-model")  # a model that would fail to load with exit 1
    for mesh, named in (("data=3", "needs 3 devices; 1 are available"), ("rows=1", "unknown axes ['rows']"),
                        ("data=two", "is not 'axis=size'")):  # fmt: skip
        assert_clean_error(run("infer", "transcribe", str(audio), "--mesh", mesh, "--model", missing_model), 2,
                           "error: --mesh:", named)  # fmt: skip
        assert_clean_error(
            run("infer", "transcribe", "--manifest", str(manifest), "--mesh", mesh, "--model", missing_model),
            2, "error: --mesh:", named,
        )  # fmt: skip
    # The server checks its mesh before loading the (real) model it is given.
    served = run("infer", "serve", "--model", cached_small_checkpoint(), "--mesh", "data=3", "--port", "1")
    assert_clean_error(served, 2, "error: --mesh:", "needs 3 devices")
    assert "loaded" not in served.stderr


def test_convert_verify_exits_1_naming_the_tensor_that_differs_and_0_for_identical_nans(tmp_path) -> None:
    src = tmp_path / "src"
    shutil.copytree(cached_small_checkpoint(), src)
    weights = src / "model.safetensors"
    tensors = load_file(weights)
    # A NaN in the source is converted bit for bit: verification must call it identical, not a difference.
    tensors["thinker.audio_tower.ln_post.weight"][0] = np.nan
    save_file(tensors, weights)
    dst = tmp_path / "dst"
    converted = run("convert", str(src), str(dst), "--verify")
    assert converted.returncode == 0, converted.stdout + converted.stderr[-3000:]
    assert "identical" in converted.stdout

    # The source changes after the conversion: verifying the existing conversion finds that one tensor.
    tensors["thinker.model.norm.weight"][3] += 0.5
    save_file(tensors, weights)
    verified = run("convert", str(src), str(dst), "--verify")
    assert_clean_error(verified, 1, "exists: verifying it")
    assert verified.stdout.startswith("verification FAILED")
    differing = verified.stdout.split("differing tensors ")[1].split("; missing files")[0]
    assert differing == "['decoder/norm/scale']", verified.stdout
    # Without --verify an existing destination is still refused as taken.
    assert_clean_error(run("convert", str(src), str(dst)), 2, "not empty")
