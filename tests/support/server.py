"""Start ``python -m infer serve`` on a free local port for tests and load runs, and make test audio files."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[2]
AUDIO_DIR = Path(tempfile.gettempdir()) / "qasr_test_serve_audio"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, process: subprocess.Popen, port: int, log: Path) -> None:
        self.process, self.port, self.log = process, port, log
        self.url = f"http://127.0.0.1:{port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)


@contextlib.contextmanager
def running_server(
    model: str, *args: str, startup_timeout: float = 600.0, env: dict | None = None
) -> Iterator[Server]:
    """A server process for ``model`` with the extra command-line ``args``, ready (``/health`` 200) on entry."""
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="qasr-serve-", suffix=".log")[1])
    command = [sys.executable, "-m", "infer", "serve", "--model", model, "--port", str(port), *args]
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})})  # fmt: skip
    server = Server(process, port, log)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{server.log_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not ready in {startup_timeout} s:\n{server.log_text()}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(server.url + "/health", timeout=2) as reply,
            ):
                if reply.status == 200:
                    break
            time.sleep(0.5)
        yield server
    finally:
        server.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def speech_file(seconds: float, seed: int = 0) -> str:
    """A 16-bit WAV of about ``seconds`` of synthetic speech (espeak-ng sentences joined), cached by its args."""
    from tests.support import speech

    AUDIO_DIR.mkdir(parents=True, exist_ok=True)
    path = AUDIO_DIR / f"speech-{seconds:.1f}-{seed}.wav"
    if path.exists():
        return str(path)
    sentences = [
        speech.MEDIUM_EN,
        speech.LONG_EN,
        "Hello world, this is a test of the server.",
        speech.SHORT_EN,
    ]
    rng = np.random.default_rng(seed)
    pieces, total = [], 0
    target = int(seconds * 16000)
    while total < target:
        clip = speech.synth(sentences[int(rng.integers(len(sentences)))], speed=int(rng.integers(140, 190)))
        pieces.append(clip)
        total += len(clip)
    samples = np.concatenate(pieces)[:target]
    tmp = path.with_suffix(f".{os.getpid()}.tmp.wav")
    sf.write(tmp, samples, 16000, subtype="PCM_16")
    os.replace(tmp, path)
    return str(path)


def speech_files(durations: Sequence[float]) -> list[str]:
    return [speech_file(d, seed=i) for i, d in enumerate(durations)]
