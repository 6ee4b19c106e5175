import os
import sys

# Tests run on the CPU in fp32 with exact matmuls so that parity tolerances mean what they say.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_sessionstart(session) -> None:
    """The suite's references must be present: espeak-ng (test speech) and the official qwen-asr package (parity).
    The README's test command installs both, so a missing one is an error here, never a quiet skip."""
    import importlib.util
    import shutil

    import pytest

    missing = [name for name, ok in (("espeak-ng", shutil.which("espeak-ng") is not None),
                                     ("qwen-asr", importlib.util.find_spec("qwen_asr") is not None)) if not ok]  # fmt: skip
    if missing:
        raise pytest.UsageError(
            f"missing test prerequisites: {', '.join(missing)}; install them with the README's test command"
        )
