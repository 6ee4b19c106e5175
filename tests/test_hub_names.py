"""Models by Hugging Face Hub name (``qasr_jax.hub``), offline, from a hub cache laid out by hand as the hub client
writes it: ``models--Owner--Name/{blobs/<hash>, snapshots/<commit>/<file> -> ../../blobs/<hash>, refs/<branch>}``.

The repos hold the demo models under models/: ``main`` their files as committed, the branch ``other`` the ASR
model with one tensor changed, so a test that loaded the wrong snapshot fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
from safetensors.numpy import load_file, save

from qasr_jax import demo
from qasr_jax.aligner import Qwen3ForcedAligner
from qasr_jax.asr import Qwen3ASRModel
from qasr_jax.errors import CheckpointError, ModelNotFoundError
from qasr_jax.hub import resolve_model
from qasr_jax.weights import load_pretrained, tree_equal

REPO = Path(__file__).resolve().parent.parent
ASR_DIR = REPO / "models" / demo.ASR_DIR_NAME
ALIGNER_DIR = REPO / "models" / demo.ALIGNER_DIR_NAME
CLIP = REPO / "examples" / "english_2.wav"
MAX_NEW_TOKENS = 6

ASR_NAME, ALIGNER_NAME = "qasr-test/Qwen3-ASR-demo", "qasr-test/Qwen3-ForcedAligner-demo"
MAIN, OTHER = "a" * 39 + "1", "b" * 39 + "2"  # commit hashes (40 hex digits)
CHANGED = "thinker.model.norm.weight"  # the tensor that differs on the branch "other"
CHANGED_PARAM = "decoder/norm/scale"


def blob_name(content: bytes, lfs: bool) -> str:
    """The hub cache's blob name: an LFS file's sha256, a git file's blob sha1."""
    if lfs:
        return hashlib.sha256(content).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def write_repo(
    cache: Path, repo_id: str, snapshots: dict[str, dict[str, bytes]], refs: dict[str, str]
) -> None:
    """A model repo in the hub cache: one blob per distinct content, each snapshot's files relative symlinks to
    them, each ref a file holding its commit (no newline, as the hub client writes it)."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    (root / "blobs").mkdir(parents=True)
    for commit, files in snapshots.items():
        for name, content in files.items():
            blob = blob_name(content, lfs=name.endswith(".safetensors"))
            if not (root / "blobs" / blob).exists():
                (root / "blobs" / blob).write_bytes(content)
            link = root / "snapshots" / commit / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.join("..", "..", "blobs", blob))
    for ref, commit in refs.items():
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / ref).write_text(commit)


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The hub cache (and an HF_HOME beside it), plus a local copy of the changed ASR snapshot."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "hub-cache"
    asr = files_of(ASR_DIR)
    tensors = load_file(ASR_DIR / "model.safetensors")
    tensors[CHANGED] = tensors[CHANGED] + np.float32(0.5)
    other = {**asr, "model.safetensors": save(tensors, metadata={"format": "pt"})}
    write_repo(cache, ASR_NAME, {MAIN: asr, OTHER: other}, {"main": MAIN, "other": OTHER})
    write_repo(cache, ALIGNER_NAME, {MAIN: files_of(ALIGNER_DIR)}, {"main": MAIN})
    changed_dir = root / "changed"
    changed_dir.mkdir()
    for name, content in other.items():
        (changed_dir / name).write_bytes(content)
    (root / "hf-home").mkdir()
    return {"cache": cache, "home": root / "hf-home", "changed": changed_dir}


@pytest.fixture(autouse=True)
def offline(hub: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1 with the cache above, for this process (the hub client reads its environment once, at
    import: its constants are set too) and for the programs the tests start."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setenv("HF_HOME", str(hub["home"]))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub["cache"]))


@pytest.fixture(scope="module")
def reference() -> dict:
    """The demo model's transcription of the clip, loaded from its local dir."""
    model = Qwen3ASRModel.from_pretrained(str(ASR_DIR), max_new_tokens=MAX_NEW_TOKENS)
    (result,) = model.transcribe(str(CLIP))
    assert result.error is None, result.error
    return {"text": result.text, "language": result.language, "token_ids": result.token_ids}


def snapshot(hub: dict[str, Path], repo_id: str, commit: str) -> str:
    return str(hub["cache"] / ("models--" + repo_id.replace("/", "--")) / "snapshots" / commit)


def test_a_name_loads_its_cached_snapshot_and_a_revision_that_snapshot(hub) -> None:
    assert resolve_model(ASR_NAME) == snapshot(hub, ASR_NAME, MAIN)
    assert resolve_model(ASR_NAME, revision="other") == snapshot(hub, ASR_NAME, OTHER)
    assert resolve_model(ASR_NAME, revision=OTHER) == snapshot(hub, ASR_NAME, OTHER)

    _, local = load_pretrained(ASR_DIR)
    _, main = load_pretrained(ASR_NAME)
    assert tree_equal(main, local) == []
    _, changed = load_pretrained(hub["changed"])
    for revision in ("other", OTHER):  # a branch, and a commit hash
        _, other = load_pretrained(ASR_NAME, revision=revision)
        assert tree_equal(other, changed) == []
        assert tree_equal(other, main) == [CHANGED_PARAM]


def test_models_and_aligners_by_name_transcribe_as_their_local_dirs(reference) -> None:
    model = Qwen3ASRModel.from_pretrained(
        ASR_NAME, forced_aligner=ALIGNER_NAME, max_new_tokens=MAX_NEW_TOKENS
    )
    assert isinstance(model.forced_aligner, Qwen3ForcedAligner)
    assert model.forced_aligner.config.is_aligner
    (result,) = model.transcribe(str(CLIP))
    assert result.error is None, result.error
    assert result.token_ids == reference["token_ids"] and result.text == reference["text"]
    assert len(reference["token_ids"]) > 0

    # The aligner by name and revision: the commit itself, as "main" names it.
    aligner = Qwen3ForcedAligner.from_pretrained(ALIGNER_NAME, revision=MAIN)
    _, local = load_pretrained(ALIGNER_DIR)
    assert tree_equal(aligner.params, local) == []


def test_a_local_directory_named_like_a_repo_id_wins_over_the_cache(hub, tmp_path, monkeypatch) -> None:
    owner, name = ASR_NAME.split("/")
    (tmp_path / owner).mkdir()
    (tmp_path / owner / name).symlink_to(hub["changed"], target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model(ASR_NAME) == ASR_NAME
    _, params = load_pretrained(ASR_NAME)
    _, main = load_pretrained(snapshot(hub, ASR_NAME, MAIN))
    assert tree_equal(params, main) == [CHANGED_PARAM]


def test_names_that_cannot_be_had_raise_model_not_found_naming_them(hub, tmp_path) -> None:
    with pytest.raises(ModelNotFoundError, match="qasr-test/absent: not a local directory") as caught:
        resolve_model("qasr-test/absent")
    message = str(caught.value)
    assert "HF_HUB_OFFLINE=1" in message and str(hub["cache"]) in message and "\n" not in message
    assert caught.value.model == "qasr-test/absent"
    assert isinstance(caught.value, CheckpointError) and isinstance(caught.value, FileNotFoundError)

    with pytest.raises(ModelNotFoundError, match=f"{ASR_NAME} at revision 'v9': .*that revision is not in"):
        load_pretrained(ASR_NAME, revision="v9")
    missing = str(tmp_path / "no-model")
    with pytest.raises(ModelNotFoundError, match=f"{missing}: no such directory"):
        Qwen3ASRModel.from_pretrained(missing)
    with pytest.raises(ModelNotFoundError, match="no-such-aligner: no such directory"):
        Qwen3ForcedAligner.from_pretrained("no-such-aligner")
    with pytest.raises(ModelNotFoundError, match="qasr-test/no-aligner: not a local directory"):
        Qwen3ASRModel.from_pretrained(ASR_NAME, forced_aligner="qasr-test/no-aligner")


def test_convert_takes_a_name_and_a_revision(hub, tmp_path) -> None:
    from convert.__main__ import main as convert_main

    assert convert_main([ASR_NAME, str(tmp_path / "dst"), "--revision", "other", "--verify"]) == 0
    _, converted = load_pretrained(tmp_path / "dst")
    _, changed = load_pretrained(hub["changed"])
    assert tree_equal(converted, changed) == []
    assert convert_main(["qasr-test/absent", str(tmp_path / "dst2")]) == 2


def test_train_config_takes_a_revision() -> None:
    from qasr_jax.training.config import load_train_config

    cfg = load_train_config(None, [f'model.checkpoint="{ASR_NAME}"', 'model.revision="other"',
                                   'data.train_manifest="train.jsonl"'])  # fmt: skip
    assert (cfg.model.checkpoint, cfg.model.revision) == (ASR_NAME, "other")


def run_infer(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "infer", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def test_the_transcribe_program_takes_a_name_offline_and_names_a_missing_one(reference) -> None:
    done = run_infer("transcribe", str(CLIP), "--model", ASR_NAME, "--max-new-tokens", str(MAX_NEW_TOKENS),
                     "--format", "json", "--no-progress")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (item,) = json.loads(done.stdout)
    assert item["text"] == reference["text"]
    assert [t for s in item["segments"] for t in s["token_ids"]] == reference["token_ids"]

    missing = run_infer("transcribe", str(CLIP), "--model", "qasr-test/absent", "--no-progress")
    assert missing.returncode == 1, missing.stderr[-3000:]
    assert "Traceback" not in missing.stderr
    errors = [line for line in missing.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "qasr-test/absent: not a local directory" in errors[0], missing.stderr
    assert "HF_HUB_OFFLINE=1" in errors[0]

    # --revision names a revision of --model: without one it is a bad argument (exit 2, nothing loaded).
    bad = run_infer("transcribe", str(CLIP), "--revision", "other")
    assert bad.returncode == 2 and "--revision needs --model" in bad.stderr
