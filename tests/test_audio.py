"""qasr_jax.audio against the official Qwen3-ASR input pipeline (qwen-asr's normalisation and splitting, the
WhisperFeatureExtractor its processor runs) and against hand-computed truth."""

from __future__ import annotations

import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf

from qasr_jax import audio
from qasr_jax.errors import (
    AudioDecodeError,
    AudioError,
    AudioFileNotFoundError,
    EmptyAudioError,
    InvalidAudioError,
)
from tests.support.speech import speech_clips, synth
from tests.support.vocab import write_preprocessor_config

MEL_TOLERANCE = 1e-4
LOAD_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def official_extractor(tmp_path_factory):
    """The WhisperFeatureExtractor with the released preprocessor_config.json settings."""
    from transformers import WhisperFeatureExtractor

    model_dir = tmp_path_factory.mktemp("preprocessor")
    write_preprocessor_config(model_dir)
    return WhisperFeatureExtractor.from_pretrained(str(model_dir))


def official_features(extractor, wavs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """What Qwen3ASRProcessor computes for a batch: (input_features [B, 128, T], feature_attention_mask [B, T])."""
    out = extractor(
        wavs,
        sampling_rate=16000,
        padding=True,
        truncation=False,
        return_attention_mask=True,
        return_tensors="np",
    )
    return out["input_features"], out["attention_mask"]


def tone(hz: float, amplitude: float, num_samples: int) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * hz * np.arange(num_samples) / 16000 + 0.3)).astype(np.float32)


@pytest.fixture(scope="module")
def mel_signals() -> dict[str, np.ndarray]:
    """Speech, silence, noise and tones from 0.3 s to 60 s, most lengths not a multiple of the hop."""
    rng = np.random.default_rng(0)
    signals = {
        "silence 0.3 s": np.zeros(4800, np.float32),
        "silence 0.31 s": np.zeros(5037, np.float32),
        "white noise": (0.3 * rng.standard_normal(32033)).astype(np.float32),
        "tone 440 Hz": tone(440.0, 0.9, 48001),
        "tone 7900 Hz": tone(7900.0, 0.99, 16159),
        "quiet tone 1234.5 Hz": tone(1234.5, 0.01, 12345),
    }
    short, medium, long = speech_clips()
    signals.update({"speech 0.7 s": short, "speech 5 s": medium, "speech 19 s": long})
    signals["speech + silence"] = np.concatenate([medium, np.zeros(20011, np.float32)])
    # 60 s (and 77 samples): speech with quiet noise between the sentences.
    parts = []
    while sum(len(p) for p in parts) < 960077:
        parts += [long, medium, (0.003 * rng.standard_normal(8000)).astype(np.float32)]
    signals["speech 60 s"] = np.concatenate(parts)[:960077]
    return signals


# --------------------------------------------------------------------------------------------------------------
# log-mel


def test_mel_filters_match_official(official_extractor):
    np.testing.assert_allclose(
        audio.mel_filters(), official_extractor.mel_filters.astype(np.float32), atol=1e-9
    )


def test_features_match_official_batch_of_one_per_item(official_extractor, mel_signals):
    names = list(mel_signals)
    input_features, mask = audio.features([mel_signals[name] for name in names])
    assert input_features.dtype == np.float32 and mask.dtype == np.int32
    assert input_features.shape == (len(names), 128, max(len(w) for w in mel_signals.values()) // 160)
    worst = 0.0
    for index, name in enumerate(names):
        reference, reference_mask = official_features(official_extractor, [mel_signals[name]])
        frames = int(reference_mask.sum())
        assert frames == reference.shape[2] == mask[index].sum() == audio.num_frames(len(mel_signals[name]))
        assert mask[index, :frames].all() and not mask[index, frames:].any()
        delta = float(np.abs(input_features[index, :, :frames] - reference[0]).max())
        assert delta <= MEL_TOLERANCE, f"{name}: max|Δ| = {delta:.2e}"
        worst = max(worst, delta)
        assert not input_features[index, :, frames:].any(), f"{name}: padded frames are not zero"
    print(f"log-mel max|Δ| vs official (batch of one): {worst:.2e}")


def test_official_features_depend_on_batch_and_ours_do_not(official_extractor):
    # 10 samples past a hop: alone, the last frame reflects the clip's own end; in a batch it sees zeros.
    short, long = tone(300.0, 0.5, 11210), tone(3000.0, 0.9, 48000)
    alone, alone_mask = official_features(official_extractor, [short])
    batched, batched_mask = official_features(official_extractor, [short, long])
    frames = int(alone_mask.sum())
    # The official batch pads the short clip with zeros before its STFT and its mask counts one frame more:
    # its features change with what it is batched with.
    assert int(batched_mask[0].sum()) == frames + 1
    assert np.abs(batched[0, :, :frames] - alone[0]).max() > 1e-2
    ours_alone, _ = audio.features([short])
    ours_batched, ours_mask = audio.features([short, long])
    assert ours_mask[0].sum() == frames
    # Equal up to the last bit or so: XLA picks its matmul kernel by shape, and the rounding follows.
    np.testing.assert_allclose(ours_batched[0, :, :frames], ours_alone[0], rtol=0, atol=1e-6)
    assert np.abs(ours_alone[0] - alone[0]).max() <= MEL_TOLERANCE


def test_features_batch_invariance_and_bucketing(mel_signals):
    names = ["silence 0.31 s", "tone 7900 Hz", "speech 5 s"]
    wavs = [mel_signals[name] for name in names]
    batched, mask = audio.features(wavs, pad_to_multiple=100)
    assert batched.shape[2] % 100 == 0 and mask.shape == (len(wavs), batched.shape[2])
    for index, wav in enumerate(wavs):
        alone, alone_mask = audio.features([wav])
        frames = alone.shape[2]
        assert mask[index].sum() == alone_mask.sum() == frames
        np.testing.assert_allclose(batched[index, :, :frames], alone[0], rtol=0, atol=1e-6)
        assert not batched[index, :, frames:].any()


def test_log_mel_is_jitted_and_compiles_once_per_shape():
    rng = np.random.default_rng(1)
    waveforms = jnp.asarray((0.1 * rng.standard_normal((3, 16000))).astype(np.float32))
    audio.log_mel(waveforms, jnp.array([16000, 9000, 300], jnp.int32))
    compiled = audio.log_mel._cache_size()
    mel, frames = audio.log_mel(waveforms, jnp.array([4000, 16000, 161], jnp.int32))
    assert audio.log_mel._cache_size() == compiled
    assert mel.shape == (3, 128, 100) and frames.tolist() == [25, 100, 1]
    # It also traces inside a caller's jit.
    total = jax.jit(lambda w, n: audio.log_mel(w, n)[0].sum())(waveforms, jnp.array([16000, 9000, 300]))
    assert np.isfinite(float(total))


def test_log_mel_hand_computed_edge_cases():
    waveforms = np.zeros((3, 3200), np.float32)
    waveforms[1, :100] = 0.5  # shorter than one hop: no frames at all
    waveforms[2] = np.nan  # past its length (0) nothing is read, not even NaN
    mel, frames = audio.log_mel(jnp.asarray(waveforms), jnp.array([3200, 100, 0], jnp.int32))
    mel = np.asarray(mel)
    assert frames.tolist() == [20, 0, 0]
    # Silence: every mel power is floored at 1e-10 → log10 = -10 → (-10 + 4) / 4.
    np.testing.assert_array_equal(mel[0], np.full((128, 20), -1.5, np.float32))
    np.testing.assert_array_equal(mel[1:], 0.0)
    # A batch whose every item is shorter than one hop has no frames, and that is not an error.
    input_features, mask = audio.features([np.full(100, 0.1, np.float32)], pad_to_multiple=8)
    assert input_features.shape == (1, 128, 0) and mask.shape == (1, 0)


def test_num_frames_matches_official_mask(official_extractor):
    for num_samples in (201, 319, 320, 321, 479, 480, 4801, 16000, 16159):
        wav = tone(500.0, 0.5, num_samples)
        _, mask = official_features(official_extractor, [wav])
        assert audio.num_frames(num_samples) == int(mask.sum()), num_samples


# --------------------------------------------------------------------------------------------------------------
# load_audio


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory) -> dict[str, str]:
    """Files of every supported container at several rates, channel counts and sample formats."""
    directory = tmp_path_factory.mktemp("audio")
    left = tone(220.0, 0.6, 44100) + tone(3100.0, 0.3, 44100)
    stereo_44k = np.stack([left, 0.5 * left[::-1]], axis=1)
    specs = {
        "int16 8 kHz.wav": (tone(330.0, 0.8, 12000), 8000, {"subtype": "PCM_16"}),
        "float 44.1 kHz stereo.wav": (stereo_44k, 44100, {"subtype": "FLOAT"}),
        "24-bit 48 kHz stereo.flac": (
            np.stack([tone(400.0, 0.7, 30000)] * 2, 1),
            48000,
            {"subtype": "PCM_24"},
        ),
        "vorbis 22.05 kHz.ogg": (tone(600.0, 0.5, 22050), 22050, {"format": "OGG", "subtype": "VORBIS"}),
        "mp3 44.1 kHz stereo.mp3": (stereo_44k, 44100, {"format": "MP3", "subtype": "MPEG_LAYER_III"}),
        "int16 16 kHz.wav": (tone(700.0, 0.9, 16000), 16000, {"subtype": "PCM_16"}),
    }
    paths = {}
    for name, (samples, rate, options) in specs.items():
        paths[name] = str(directory / name)
        sf.write(paths[name], samples, rate, **options)
    paths["speech 22.05 kHz int16.wav"] = str(directory / "speech.wav")
    sf.write(paths["speech 22.05 kHz int16.wav"], synth("Hello there.", sr=22050), 22050, subtype="PCM_16")
    return paths


def test_load_audio_files_match_official(official_utils, audio_files):
    for name, path in audio_files.items():
        reference = official_utils.normalize_audio_input(path)
        ours = audio.load_audio(path)
        assert ours.dtype == np.float32 and ours.shape == reference.shape, name
        assert np.abs(ours - reference).max() <= LOAD_TOLERANCE, name
        # The same file given as bytes decodes identically.
        with open(path, "rb") as handle:
            np.testing.assert_array_equal(audio.load_audio(handle.read()), ours)


def array_sources() -> dict[str, tuple[np.ndarray, int]]:
    stereo = np.stack([tone(250.0, 0.6, 44100), tone(2500.0, 0.4, 44100)], axis=1)
    return {
        "float32 8 kHz": (tone(300.0, 0.7, 8000), 8000),
        "float32 48 kHz [channels, time]": (
            np.stack([tone(500.0, 0.5, 48000), tone(90.0, 0.2, 48000)]),
            48000,
        ),
        "float32 44.1 kHz [time, channels]": (stereo, 44100),
        "int16 44.1 kHz [time, channels]": ((stereo * 20000).astype(np.int16), 44100),
        "int16 16 kHz": ((tone(800.0, 0.5, 16000) * 9000).astype(np.int16), 16000),
        "float64 16 kHz, peak 3": (tone(800.0, 3.0, 16000).astype(np.float64), 16000),
        "float32 48 kHz, peak 2.5": (tone(1000.0, 2.5, 48000), 48000),
        "float32 16 kHz [1, time]": (tone(100.0, 0.1, 16000)[None, :], 16000),
    }


@pytest.mark.parametrize("name", list(array_sources()))
def test_load_audio_arrays_match_official(official_utils, name):
    source = array_sources()[name]
    reference = official_utils.normalize_audio_input(source)
    ours = audio.load_audio(source)
    assert ours.dtype == np.float32 and ours.shape == reference.shape
    assert np.abs(ours - reference).max() <= LOAD_TOLERANCE


def test_load_audio_normalisation_by_hand():
    quiet = tone(440.0, 0.5, 16000)
    # In range: untouched, bit for bit.
    np.testing.assert_array_equal(audio.load_audio((quiet, 16000)), quiet)
    # Peak above 1: divided by the peak.
    loud = quiet * 4.0
    np.testing.assert_allclose(audio.load_audio((loud, 16000)), loud / np.abs(loud).max(), rtol=0, atol=1e-7)
    # Integer arrays are taken at their values and peak-normalised, at any rate (the official code only
    # accepts them at 16 kHz or with several channels).
    pcm = (quiet * 12000).astype(np.int16)
    np.testing.assert_allclose(
        audio.load_audio((pcm, 16000)), pcm / np.abs(pcm.astype(np.float32)).max(), rtol=0, atol=1e-7
    )
    at_8k = audio.load_audio((pcm[::2], 8000))
    np.testing.assert_allclose(
        at_8k, audio.load_audio((pcm[::2].astype(np.float32), 8000)), rtol=0, atol=1e-7
    )
    assert np.abs(at_8k).max() == pytest.approx(1.0, abs=1e-6)
    # Resampled length is ceil(n · 16000 / rate).
    assert audio.load_audio((tone(300.0, 0.5, 100), 44100)).shape == (37,)
    assert audio.SAMPLE_RATE == 16000


# --------------------------------------------------------------------------------------------------------------
# Errors


def truncated_copies(audio_files, directory) -> dict[str, str]:
    paths = {}
    names = (
        "float 44.1 kHz stereo.wav",
        "24-bit 48 kHz stereo.flac",
        "vorbis 22.05 kHz.ogg",
        "mp3 44.1 kHz stereo.mp3",
    )
    for name in names:
        with open(audio_files[name], "rb") as handle:
            data = handle.read()
        paths[name] = str(directory / f"truncated {name}")
        with open(paths[name], "wb") as handle:
            handle.write(data[: len(data) // 2])
    return paths


def test_unreadable_and_truncated_files_raise_decode_error_naming_them(audio_files, tmp_path):
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("this is not a sound file\n" * 20)
    for path in [str(not_audio), *truncated_copies(audio_files, tmp_path).values()]:
        with pytest.raises(AudioDecodeError, match=r"truncated|cannot decode") as error:
            audio.load_audio(path)
        assert path in str(error.value)
    with pytest.raises(AudioDecodeError, match="directory"):
        audio.load_audio(tmp_path)
    with open(audio_files["int16 16 kHz.wav"], "rb") as handle:
        half = handle.read()[:20000]
    with pytest.raises(AudioDecodeError, match="<bytes>"):
        audio.load_audio(half)
    with pytest.raises(AudioDecodeError, match="item 7"):
        audio.load_audio(b"RIFF....WAVEjunk" * 10, name="item 7")


def test_streamed_wav_with_placeholder_sizes_is_not_truncated(audio_files):
    with open(audio_files["int16 16 kHz.wav"], "rb") as handle:
        data = bytearray(handle.read())
    # Writers that stream a WAV leave 0xFFFFFFFF where the RIFF and data sizes go.
    data[4:8] = struct.pack("<I", 0xFFFFFFFF)
    data_chunk = data.find(b"data")
    data[data_chunk + 4 : data_chunk + 8] = struct.pack("<I", 0xFFFFFFFF)
    np.testing.assert_array_equal(
        audio.load_audio(bytes(data)), audio.load_audio(audio_files["int16 16 kHz.wav"])
    )


def test_missing_file_raises_not_found_naming_it(tmp_path):
    path = str(tmp_path / "absent.flac")
    with pytest.raises(AudioFileNotFoundError, match=r"absent\.flac"):
        audio.load_audio(path)
    with pytest.raises(AudioFileNotFoundError, match="item 3"):
        audio.load_audio(path, name="item 3")
    assert issubclass(AudioFileNotFoundError, FileNotFoundError)


def test_empty_audio_raises_empty_error_naming_it(tmp_path):
    empty_wav = str(tmp_path / "empty.wav")
    sf.write(empty_wav, np.zeros(0, np.float32), 16000)
    cases = [
        (empty_wav, empty_wav),
        (b"", "<bytes>"),
        ((np.zeros(0, np.float32), 16000), "<array>"),
        ((np.zeros((2, 0), np.float32), 16000), "<array>"),
    ]
    for source, label in cases:
        with pytest.raises(EmptyAudioError) as error:
            audio.load_audio(source)
        assert label in str(error.value)
    with pytest.raises(EmptyAudioError, match="item 0"):
        audio.load_audio((np.zeros(0), 8000), name="item 0")


def test_invalid_samples_and_rates_raise_invalid_error_naming_them(tmp_path):
    good = tone(200.0, 0.5, 1600)
    with_nan, with_inf = good.copy(), good.copy()
    with_nan[10], with_inf[20] = np.nan, -np.inf
    nan_file = str(tmp_path / "nan.wav")
    sf.write(nan_file, with_nan, 16000, subtype="FLOAT")
    cases = {
        "NaN": ((with_nan, 16000), "NaN"),
        "Inf": ((with_inf, 16000), "NaN or Inf"),
        "rank 0": ((np.float32(0.5), 16000), "shape"),
        "rank 3": ((np.zeros((2, 2, 100), np.float32), 16000), "shape"),
        "rate 0": ((good, 0), "sample rate"),
        "rate < 0": ((good, -16000), "sample rate"),
        "rate NaN": ((good, float("nan")), "sample rate"),
        "rate str": ((good, "16000"), "sample rate"),
        "complex": ((good.astype(np.complex64), 16000), "dtype"),
    }
    for case, (source, reason) in cases.items():
        with pytest.raises(InvalidAudioError, match=reason) as error:
            audio.load_audio(source, name=f"clip {case}")
        assert f"clip {case}" in str(error.value)
    with pytest.raises(InvalidAudioError, match=r"nan\.wav"):
        audio.load_audio(nan_file)
    with pytest.raises(InvalidAudioError, match="<array>"):
        audio.load_audio((np.zeros((1, 1, 1)), 16000))
    with pytest.raises(AudioError, match="expected a path"):
        audio.load_audio([0.0, 0.1])


# --------------------------------------------------------------------------------------------------------------
# split_audio


def assert_split_matches_official(
    official_utils, wav, max_seconds, search_seconds=5.0, window_ms=100.0, sr=16000
):
    reference = official_utils.split_audio_into_chunks(
        wav, sr, max_seconds, search_expand_sec=search_seconds, min_window_ms=window_ms
    )
    pieces = audio.split_audio(wav, max_seconds, sr=sr, search_seconds=search_seconds, window_ms=window_ms)
    assert len(pieces) == len(reference)
    for piece, (reference_samples, reference_offset) in zip(pieces, reference):
        np.testing.assert_array_equal(piece.samples, reference_samples)
        assert piece.offset_seconds == pytest.approx(reference_offset, abs=1e-9)
    # Without the padding, the pieces are the input, back to back.
    assert [piece.start for piece in pieces] == [0, *np.cumsum([p.num_samples for p in pieces])[:-1].tolist()]
    np.testing.assert_array_equal(np.concatenate([piece.unpadded for piece in pieces]), wav)
    return pieces


def test_split_audio_matches_official_on_speech(official_utils):
    rng = np.random.default_rng(2)
    short, medium, long = speech_clips()
    gap = np.zeros(6000, np.float32)
    wav = np.concatenate([long, gap, medium, (0.002 * rng.standard_normal(9000)).astype(np.float32), long])
    wav = np.concatenate([wav, short[: len(short) // 3]])
    assert len(wav) / 16000 > 40
    for max_seconds in (7.0, 10.0, 12.5, 20.0, 40.0):
        pieces = assert_split_matches_official(official_utils, wav, max_seconds)
        assert len(pieces) > 1


def test_split_audio_matches_official_on_random_signals(official_utils):
    rng = np.random.default_rng(3)
    for _ in range(12):
        length = int(rng.integers(2000, 30000))
        wav = (rng.standard_normal(length) * rng.uniform(0.01, 1.0)).astype(np.float32)
        # Runs of exact silence make ties between windows; the first quietest window wins.
        for _ in range(int(rng.integers(0, 4))):
            start = int(rng.integers(0, length))
            wav[start : start + int(rng.integers(100, 8000))] = 0.0
        assert_split_matches_official(
            official_utils,
            wav,
            max_seconds=float(rng.uniform(0.25, 1.2)),
            search_seconds=float(rng.choice([0.0, 0.01, 0.1, 0.3])),
            window_ms=float(rng.choice([0.1, 5.0, 20.0, 100.0])),
        )


def test_split_audio_padding_by_hand():
    wav = tone(300.0, 0.5, 16000 * 10 + 3200)  # 10.2 s
    # Without a search window the cut is exactly at 10 s; the 0.2 s tail is zero-padded to 0.5 s.
    head, tail = audio.split_audio(wav, 10.0, search_seconds=0.0)
    assert (head.start, head.num_samples, len(head.samples)) == (0, 160000, 160000)
    assert (tail.start, tail.num_samples, len(tail.samples)) == (160000, 3200, 8000)
    assert tail.offset_seconds == 10.0
    np.testing.assert_array_equal(tail.samples[:3200], wav[160000:])
    np.testing.assert_array_equal(tail.samples[3200:], 0.0)
    # Audio within the limit is returned whole and never padded, however short.
    (only,) = audio.split_audio(wav[:1600], 10.0)
    assert (only.start, only.num_samples, len(only.samples)) == (0, 1600, 1600)


def test_split_audio_rejects_bad_arguments():
    with pytest.raises(InvalidAudioError, match="1-D"):
        audio.split_audio(np.zeros((2, 100), np.float32), 1.0)
    with pytest.raises(ValueError, match="max_seconds"):
        audio.split_audio(np.zeros(100, np.float32), 0.0)
