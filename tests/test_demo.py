"""The demo-model tooling: the espeak-ng data generator, the held-out metrics, and the demo configs train.

The held-out set is generated here with espeak-ng (``train.synth``): test-split sentences (never generated for
training, whatever the seed) spoken by test-split voice variants (never used in training), with a seed of its own.
Any regression in features, encoder, decoder, decoding, tokenizer or aligner code shows up as missed bars.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qasr_jax import demo
from tests.support.speech import have_espeak

pytestmark = pytest.mark.skipif(not have_espeak(), reason="espeak-ng is not installed")

REPO = Path(__file__).resolve().parent.parent
HELD_OUT_SEED = 7
HELD_OUT_PER_LANGUAGE = 40
MAX_MODEL_BYTES = 20 * 1024 * 1024


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from train import synth

    out = tmp_path_factory.mktemp("demo_held_out")
    return synth.write_split(
        out, "test", 2 * HELD_OUT_PER_LANGUAGE, seed=HELD_OUT_SEED, languages=["English", "German"]
    )


def test_default_paths_follow_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(demo.ASR_ENV, str(tmp_path / "asr"))
    monkeypatch.setenv(demo.ALIGNER_ENV, str(tmp_path / "aligner"))
    assert demo.default_model_path() == tmp_path / "asr"
    assert demo.default_aligner_path() == tmp_path / "aligner"


def test_proportional_baseline_spreads_words_by_length() -> None:
    times = demo.proportional_times(["a", "bbb"], 1.0, 2.0)
    assert times == [(1.0, 1.25), (1.25, 2.0)]


def test_word_errors_count_substitutions_deletions_and_insertions() -> None:
    assert demo.word_errors(["a", "b", "c"], ["a", "x", "c", "d"]) == 2
    assert demo.word_errors([], ["a"]) == 1
    assert demo.normalize_words("Der Hund, 12 Äpfel.") == ["der", "hund", "12", "äpfel"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["demo_asr_words", "demo_asr", "demo_aligner"])
def test_demo_config_trains_a_few_steps(name: str, held_out: Path, tmp_path: Path) -> None:
    from qasr_jax.train import load_train_config, train
    from train import demo_init

    kind = "aligner" if name == "demo_aligner" else "asr"
    config = demo_init.asr_config() if kind == "asr" else demo_init.aligner_config()
    start = tmp_path / "init"
    demo_init.write_initial_checkpoint(start, REPO / "train" / "configs" / f"demo_{kind}_init", config)
    overrides = [
        f"model.checkpoint={json.dumps(str(start))}",
        f"data.train_manifest={json.dumps(str(held_out))}",
        'data.eval_manifest=""',
        "data.batch_size=4",
        "run.steps=3",
        "run.log_every=1",
        "run.progress=false",
        "run.async_checkpointing=false",
        f"run.output_dir={json.dumps(str(tmp_path / 'run'))}",
        'run.export_dir=""',
    ]
    losses: list[float] = []
    config = load_train_config(REPO / "train" / "configs" / f"{name}.toml", overrides)
    summary = train(config, callbacks=[lambda step, metrics: losses.append(metrics["loss"])])
    assert summary["step"] == 3
    assert len(losses) == 3 and np.all(np.isfinite(losses)) and losses[0] > 0


def test_synth_splits_differ_in_sentences_and_voices() -> None:
    from train import synth

    plans = {split: synth.plan_split(split, 40, 0, ["English", "German"]) for split in synth.SPLITS}
    texts = {split: {(p.language, p.text) for p in plan} for split, plan in plans.items()}
    variants = {split: {p.voice.split("+")[1] for p in plan} for split, plan in plans.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not texts[a] & texts[b]
        assert not variants[a] & variants[b]
    assert all(synth.sentence_split(lang, text) == "test" for lang, text in texts["test"])


def test_synth_word_times_are_where_the_speech_is(tmp_path: Path) -> None:
    import soundfile

    from train import synth

    espeak = synth.Espeak()
    plan = synth.plan_split("val", 1, 3, ["English"])[0]
    clean = synth.render(plan, espeak)
    again = synth.render(plan, espeak)
    np.testing.assert_array_equal(clean.audio, again.audio)
    assert [w for w, _, _ in clean.word_times] == [synth.aligner_word(w) for w in plan.words]
    manifest = synth.write_split(tmp_path, "val", 2, seed=3, languages=["German"])
    row = json.loads(manifest.read_text().splitlines()[0])
    audio, rate = soundfile.read(tmp_path / row["audio"])
    assert rate == synth.SAMPLE_RATE and abs(len(audio) / rate - row["duration"]) < 1e-3
    envelope = np.abs(audio)
    for word in row["words"]:
        inside = envelope[int(word["start"] * rate) : int(word["end"] * rate)]
        gap_before = envelope[max(int(word["start"] * rate) - 400, 0) : int(word["start"] * rate) - 80]
        # Inside a word there is speech well above anything in the pause just before it (noise included).
        assert inside.max() > 2 * gap_before.max(initial=1e-4)


def test_demo_init_reproduces_the_committed_configs_and_tokenizer(tmp_path: Path) -> None:
    from train import demo_init

    assert demo_init.main(["--out", str(tmp_path)]) == 0
    for name in ("demo_asr_init", "demo_aligner_init"):
        committed = REPO / "train" / "configs" / name
        files = sorted(p.name for p in committed.iterdir())
        assert files == sorted(p.name for p in (tmp_path / name).iterdir())
        for file in files:
            assert (tmp_path / name / file).read_bytes() == (committed / file).read_bytes(), f"{name}/{file}"
