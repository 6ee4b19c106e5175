"""Multi-host runs for real: two processes × 4 CPU devices joined by ``jax.distributed`` on 127.0.0.1.

A manifest job split over the two processes writes what one process writes, resumes after one process is killed
mid-way, and, when process 0 dies in the middle of merging the parts, a rerun with another process count finishes
the merge with nothing lost or written twice; one train step and a checkpoint round trip over both processes equal
one device.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile

from tests.support import speech
from tests.test_asr import cached_small_checkpoint

REPO = Path(__file__).resolve().parent.parent
PROCESS_TIMEOUT = 600


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_env(compile_cache: Path | None = None) -> dict[str, str]:
    """A subprocess environment with 4 CPU devices (set before jax is imported there)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        TOKENIZERS_PARALLELISM="false",
    )
    if compile_cache is not None:
        env.update(
            JAX_COMPILATION_CACHE_DIR=str(compile_cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"
        )
    return env


@contextlib.contextmanager
def processes(commands: list[list[str]], env: dict[str, str], logs: Path) -> Iterator[list[subprocess.Popen]]:
    """Start one subprocess per command (stdout/stderr to ``logs/<i>.out|err``); every one still running when the
    block ends is killed."""
    logs.mkdir(parents=True, exist_ok=True)
    started: list[subprocess.Popen] = []
    with contextlib.ExitStack() as files:
        try:
            for i, command in enumerate(commands):
                out = files.enter_context(open(logs / f"{i}.out", "w"))
                err = files.enter_context(open(logs / f"{i}.err", "w"))
                started.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err))
            yield started
        finally:
            for process in started:
                if process.poll() is None:
                    process.kill()
                process.wait(timeout=30)


def wait_all(started: list[subprocess.Popen], logs: Path, timeout: float = PROCESS_TIMEOUT) -> list[str]:
    """Wait for every process (within ``timeout`` s in all); their stdout texts. Fails with their stderr tails."""
    deadline = time.monotonic() + timeout
    for process in started:
        try:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"timed out; stderr: {read_tails(logs, len(started))}") from None
    codes = [p.returncode for p in started]
    assert all(code == 0 for code in codes), (codes, read_tails(logs, len(started)))
    return [(logs / f"{i}.out").read_text() for i in range(len(started))]


def read_tails(logs: Path, count: int) -> list[str]:
    return [(logs / f"{i}.err").read_text()[-3000:] for i in range(count)]


# --------------------------------------------------------------------------------------------------------------
# Manifest jobs


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_job(tmp_path: Path) -> tuple[Path, list[str]]:
    """A manifest of 12 clips of 0.7–19 s (wav at 16 and 22.05 kHz, flac) and one file that is not audio;
    returns it and the ids that can succeed."""
    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    clips = speech.speech_clips()
    lines, good = [], []
    for i in range(12):
        samples = clips[i % 3][: int((0.6 + 0.25 * i) * 16000)] if i % 3 == 2 else clips[i % 3]
        if i % 4 == 1:
            name = f"clip{i}.flac"
            soundfile.write(audio_dir / name, samples, 16000)
        elif i % 4 == 3:
            import soxr

            name = f"clip{i}.wav"
            soundfile.write(audio_dir / name, soxr.resample(samples, 16000, 22050), 22050)
        else:
            name = f"clip{i}.wav"
            soundfile.write(audio_dir / name, samples, 16000)
        language = "English" if i % 5 == 0 else None
        lines.append(json.dumps({"id": f"item-{i}", "path": f"audio/{name}", "language": language}))
        good.append(f"item-{i}")
    (audio_dir / "notes.wav").write_text("not audio")
    lines.insert(5, json.dumps({"id": "broken", "path": "audio/notes.wav"}))
    manifest = tmp_path / "job.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest, good


def transcribe_command(manifest: Path, output: Path, checkpoint: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "infer", "transcribe", "--manifest", str(manifest), "--output", str(output),
            "--model", checkpoint, "--batch-size", "2", "--max-new-tokens", "5", "--no-progress", "--workers", "2",
            *extra]  # fmt: skip


def on_processes(command: list[str], port: int) -> list[list[str]]:
    return [[*command, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)]
            for i in range(2)]  # fmt: skip


@pytest.mark.slow
def test_manifest_split_over_two_processes_equals_one_process_and_resumes_after_kills_with_any_count(
    tmp_path,
):
    checkpoint = cached_small_checkpoint()
    manifest, good = write_job(tmp_path)
    env = cpu_env(tmp_path / "jax-cache")

    single_out = tmp_path / "single.jsonl"
    single = subprocess.run(transcribe_command(manifest, single_out, checkpoint), cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=PROCESS_TIMEOUT)  # fmt: skip
    assert single.returncode == 1 and "broken" in single.stderr, single.stderr[-3000:]
    reference = {r["id"]: r for r in read_jsonl(single_out)}
    assert sorted(reference) == sorted(good)
    assert all(r["text"] for r in reference.values())

    # Two processes, each splitting its batches over its 4 devices; process 1 is killed after its first result.
    output = tmp_path / "multi.jsonl"
    command = transcribe_command(manifest, output, checkpoint, "--mesh", "data=2,tensor=2")
    part = Path(f"{output}.part-00001-of-00002")
    with processes(on_processes(command, free_port()), env, tmp_path / "killed") as started:
        deadline = time.monotonic() + PROCESS_TIMEOUT
        while not (part.exists() and part.read_text().count("\n") >= 1):
            assert time.monotonic() < deadline and started[1].poll() is None, read_tails(
                tmp_path / "killed", 2
            )
            time.sleep(0.02)
        started[1].send_signal(signal.SIGKILL)
        started[1].wait(timeout=30)
        time.sleep(1.0)
        started[0].kill()  # it would wait at the final barrier for a process that is gone
    written = [r["id"] for p in (output, part, Path(f"{output}.part-00000-of-00002")) if p.exists()
               for r in read_jsonl(p)]  # fmt: skip
    # Killed mid-way: process 1 wrote some of its results and the job as a whole is not done, so the rerun below
    # has something both to skip and to resume (a kill that came too late would make it test nothing).
    assert part.exists() and len(read_jsonl(part)) >= 1
    assert len(written) < len(good), written
    assert len(set(written)) == len(written)

    # The rerun with another process count, one: it skips what the two wrote, transcribes the rest into the output
    # and merges their parts, and is killed the moment its merge starts removing them, with every record in the
    # output and every part still there (tests.support.die_during_merge).
    rerun = [sys.executable, "-m", "tests.support.die_during_merge", *command[3:]]
    killed = subprocess.run(rerun, cwd=REPO, env=env, capture_output=True, text=True, timeout=PROCESS_TIMEOUT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert f"skipping {len(written)} item(s)" in killed.stderr, killed.stderr[-3000:]
    assert sorted(tmp_path.glob("multi.jsonl.part-*"))  # died inside the merge
    assert sorted(r["id"] for r in read_jsonl(output)) == sorted(good)

    # Two processes again: only the broken item is left (it fails on the process it falls to, alone), and process
    # 0 finishes the merge.
    with processes(on_processes(command, free_port()), env, tmp_path / "rerun") as started:
        codes = [p.wait(timeout=PROCESS_TIMEOUT) for p in started]
    errs = read_tails(tmp_path / "rerun", 2)
    assert sorted(codes) == [0, 1], (codes, errs)
    assert "broken" in errs[0] + errs[1] and f"skipping {len(good)} item(s)" in errs[0], errs
    merged = read_jsonl(output)
    ids = [r["id"] for r in merged]
    assert sorted(ids) == sorted(good), ids  # nothing lost, nothing twice
    assert not list(tmp_path.glob("multi.jsonl.part-*"))  # merged and removed
    for record in merged:
        expected = reference[record["id"]]
        assert (record["language"], record["text"], record.get("truncated")) == (
            expected["language"], expected["text"], expected.get("truncated")), record["id"]  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Training


def test_train_step_and_checkpoint_over_two_processes_equal_one_device(tmp_path):
    """The batch's rows split over two processes (mesh data=2,fsdp=2,tensor=2 over their 8 devices): one AdamW
    step equals one device's, the checkpoint both processes write restores to the same state in the two processes
    and on one device."""
    env = cpu_env()
    port = free_port()
    commands = [[sys.executable, "-m", "tests.support.multihost_train", "multi", str(tmp_path), str(port), str(i)]
                for i in range(2)]  # fmt: skip
    with processes(commands, env, tmp_path / "multi") as started:
        outs = [json.loads(text.strip().splitlines()[-1]) for text in wait_all(started, tmp_path / "multi")]
    print(json.dumps(outs, indent=1))
    assert [o["rows"] for o in outs] == [[0, 4], [4, 8]]  # each process fed half the batch
    for out in outs:
        assert out["sharded_across_processes"] > 0  # params really live on both processes' devices
        assert out["restored_step"] == 1 and out["restored_equal"] and out["opt_state_equal"], out
        assert out["data_state"] == {"position": 8} and out["meta"] == {"processes": 2}
    assert outs[0]["metrics"] == outs[1]["metrics"]

    single = subprocess.run([sys.executable, "-m", "tests.support.multihost_train", "single", str(tmp_path)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=PROCESS_TIMEOUT)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    result = json.loads(single.stdout.strip().splitlines()[-1])
    print(json.dumps(result, indent=1))
    reference, multi = result["metrics"], outs[0]["metrics"]
    # The tolerances of the single-process mesh test (tests/test_train.py).
    assert abs(multi["loss"] - reference["loss"]) / abs(reference["loss"]) <= 1e-5
    assert abs(multi["grad_norm"] - reference["grad_norm"]) / reference["grad_norm"] <= 1e-5
    assert result["param_rel_max"] <= 1e-5, result
    assert result["restored_rel_max"] <= 1e-5 and result["restored_equals_multi"], result
    assert result["zero_gradient_leaf_step"] <= 1e-3 * 1.001, result
    assert result["changed_leaves"] >= result["leaves"] - 1  # the step moved (almost) every param
    assert np.isfinite(reference["loss"])
