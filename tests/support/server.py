"""Start ``python -m infer serve`` on a free local port for tests and load runs, read its ``/metrics``, and make
test audio files."""

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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[2]
AUDIO_DIR = Path(tempfile.gettempdir()) / "qasr_test_serve_audio"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metric(url: str, name: str, headers: dict[str, str] | None = None) -> float | None:
    """The value of the sample ``name`` (labels included, as in ``qasr_heap_bytes{kind="in_use"}``) on the
    ``/metrics`` page of the server at ``url``; None when the page has no such sample."""
    for line in httpx.get(url + "/metrics", headers=headers, timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


class Server:
    def __init__(self, process: subprocess.Popen, port: int, log: Path, api_key: str | None = None) -> None:
        self.process, self.port, self.log = process, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def metric(self, name: str) -> float:
        value = read_metric(self.url, name, self.headers)
        assert value is not None, f"/metrics has no sample {name}"
        return value

    def wait_for_metric(self, name: str, done: Callable[[float], bool], timeout: float = 60.0) -> float:
        """Poll the sample ``name`` until ``done(value)`` holds and return that value; an AssertionError naming
        the last value when ``timeout`` seconds pass first."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.metric(name)
            if done(value):
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} is still {value:g} after {timeout:g} s")
            time.sleep(0.05)

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
    environment = {**os.environ, **(env or {})}
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=environment
        )
    api_key = args[args.index("--api-key") + 1] if "--api-key" in args else environment.get("QASR_API_KEY")
    server = Server(process, port, log, api_key)
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
