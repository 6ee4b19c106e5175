"""Every audio file a user has: MP3 from every encoder setting, containers and codecs libsndfile does not read
(through FFmpeg's libraries), URLs, base64, stdin and raw PCM, each against the official loader (librosa with its
FFmpeg fallback) and with typed errors for what cannot be used."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import os
import subprocess
import threading
import time

import numpy as np
import pytest
import soundfile as sf

from qasr_jax import audio, audio_files
from qasr_jax.errors import (
    AudioDecodeError,
    AudioFileNotFoundError,
    AudioTooLongError,
    EmptyAudioError,
    InvalidAudioError,
)
from tests.support.media import encode
from tests.support.speech import synth, synth_wav
from tests.test_audio import LOAD_TOLERANCE

SPEECH = "Podcasts, videos and voice notes all carry speech worth transcribing."


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory) -> str:
    """espeak-ng speech (22.05 kHz int16 mono) with a quieter reversed copy as a second channel, 44.1 kHz."""
    directory = tmp_path_factory.mktemp("speech")
    mono = synth(SPEECH, sr=44100)
    path = str(directory / "speech 44.1 kHz stereo.wav")
    sf.write(path, np.stack([mono, 0.4 * mono[::-1]], axis=1), 44100, subtype="PCM_16")
    return path


def sox(source: str, target: str, *options: str) -> str:
    """``sox source [options…] target`` with the encoder options before the output name."""
    subprocess.run(["sox", source, *options, target], check=True, capture_output=True)
    return target


@pytest.fixture(scope="module")
def mp3_files(speech_wav, tmp_path_factory) -> dict[str, str]:
    """MP3s from sox (libmp3lame, with an Xing/Info header) at every common rate, mono and stereo, CBR and VBR,
    and from FFmpeg's muxer without an Xing header and with ID3v2 + ID3v1 tags."""
    directory = tmp_path_factory.mktemp("mp3")
    files = {}
    for rate in (8000, 16000, 22050, 44100, 48000):
        for channels in (1, 2):
            for mode, compression in (("CBR", "64"), ("VBR", "-4.2")):
                name = f"sox {rate} Hz {channels} ch {mode}.mp3"
                files[name] = sox(
                    speech_wav, str(directory / name), "-C", compression, "-r", str(rate), "-c", str(channels)
                )
    samples, rate = sf.read(speech_wav, dtype="float32")
    files["no Xing header, 44.1 kHz stereo"] = encode(
        str(directory / "noxing.mp3"), samples, rate, "mp3", "mp3", bit_rate=128000,
        muxer_options={"write_xing": "0"},
    )  # fmt: skip
    files["ID3v2 and ID3v1 tags, 22.05 kHz mono"] = encode(
        str(directory / "tagged.mp3"), samples[::2, 0], rate // 2, "mp3", "mp3", bit_rate=64000,
        muxer_options={"write_id3v1": "1"}, metadata={"title": "a talk", "artist": "someone"},
    )  # fmt: skip
    return files


def test_mp3s_from_every_encoder_setting_load_as_the_official_loader_loads_them(official_utils, mp3_files):
    """The sox 22.05/44.1 kHz files were refused as truncated before (libsndfile's MP3 frame count is an
    estimate); every one loads now, with the official loader's samples."""
    for name, path in mp3_files.items():
        reference = official_utils.normalize_audio_input(path)
        ours = audio.load_audio(path)
        assert ours.shape == reference.shape, name
        assert np.abs(ours - reference).max() <= LOAD_TOLERANCE, name
    with open(mp3_files["ID3v2 and ID3v1 tags, 22.05 kHz mono"], "rb") as handle:
        data = handle.read()
    assert data.startswith(b"ID3") and data[-128:-125] == b"TAG"  # the tags this case is about


def frame_offsets(path: str) -> list[int]:
    """Byte offsets of an MP3's audio packets as FFmpeg's demuxer reports them (an independent frame walker)."""
    import av

    with av.open(path) as container:
        return [packet.pos for packet in container.demux(audio=0) if packet.size and packet.pos is not None]


def test_truncated_mp3s_raise_a_decode_error_and_whole_ones_do_not(mp3_files, tmp_path):
    # With an Xing/Info header (sox's VBR files, FFmpeg's muxer by default) even a cut exactly between two frames
    # is seen, by the frame count; without one (sox's CBR files) a cut inside a frame is.
    cases = {
        "sox 44100 Hz 2 ch VBR.mp3": True,
        "sox 22050 Hz 1 ch VBR.mp3": True,
        "ID3v2 and ID3v1 tags, 22.05 kHz mono": True,
        "sox 44100 Hz 2 ch CBR.mp3": False,
        "no Xing header, 44.1 kHz stereo": False,
    }
    for name, has_header in cases.items():
        path = mp3_files[name]
        with open(path, "rb") as handle:
            data = handle.read()
        assert (b"Xing" in data[:4096] or b"Info" in data[:4096]) == has_header, name
        offsets = frame_offsets(path)
        assert len(offsets) > 20, name
        cuts = [len(data) // 2 + 5, (3 * len(data)) // 4 + 1, offsets[-1] + 10, offsets[5] + 3]
        if has_header:
            cuts += [offsets[-3], offsets[len(offsets) // 2]]  # exactly between two frames
        for cut in cuts:
            target = tmp_path / f"cut at {cut} of {os.path.basename(path)}"
            target.write_bytes(data[:cut])
            with pytest.raises(AudioDecodeError, match="truncated") as error:
                audio.load_audio(str(target))
            assert str(target) in str(error.value)
            with pytest.raises(AudioDecodeError, match="truncated"):
                audio.load_audio(data[:cut])
        assert audio_files.mp3_truncation(data) is None, name


@pytest.fixture(scope="module")
def container_files(speech_wav, tmp_path_factory) -> dict[str, str]:
    """Files libsndfile cannot read (and two it can), made with PyAV's encoders: a video fixture is black frames
    with the speech."""
    import soxr

    directory = tmp_path_factory.mktemp("containers")
    stereo, rate = sf.read(speech_wav, dtype="float32")
    at_48k = soxr.resample(stereo, rate, 48000).astype(np.float32)
    at_8k = soxr.resample(stereo[:, 0], rate, 8000).astype(np.float32)
    d = str(directory)
    files = {
        "m4a (AAC)": encode(f"{d}/podcast.m4a", stereo, rate, "ipod", "aac", bit_rate=96000),
        "mp4 video (H.264 + AAC)": encode(f"{d}/clip.mp4", stereo, rate, "mp4", "aac", video="h264"),
        "webm video (VP9 + Opus)": encode(
            f"{d}/clip.webm", at_48k, 48000, "webm", "libopus", video="libvpx-vp9"
        ),
        "mkv video (MPEG-4 + FLAC)": encode(f"{d}/clip.mkv", stereo, rate, "matroska", "flac", video="mpeg4"),
        "mkv (Opus)": encode(f"{d}/audio.mka", at_48k, 48000, "matroska", "libopus"),
        "opus (Ogg)": encode(f"{d}/note.opus", at_48k[:, 0], 48000, "ogg", "libopus"),
        "amr (AMR-NB, 8 kHz)": encode(
            f"{d}/phone.amr", at_8k, 8000, "amr", "libopencore_amrnb", bit_rate=12200
        ),
        "aiff": f"{d}/speech.aiff",
        "8 kHz phone wav": f"{d}/phone.wav",
    }
    sf.write(files["aiff"], stereo, rate, format="AIFF", subtype="PCM_16")
    sf.write(files["8 kHz phone wav"], at_8k, 8000, subtype="PCM_16")
    return files


def test_containers_and_codecs_load_as_the_official_loader_loads_them(official_utils, container_files):
    for name, path in container_files.items():
        reference = official_utils.normalize_audio_input(path)
        ours = audio.load_audio(path)
        assert ours.shape == reference.shape, name
        assert np.abs(ours - reference).max() <= LOAD_TOLERANCE, name
        assert np.abs(ours).max() > 0.05, name  # speech, not silence
        # The bytes of the file decode the same (the official loader cannot decode these from bytes).
        with open(path, "rb") as handle:
            np.testing.assert_array_equal(audio.load_audio(handle.read()), ours)


# The Matroska CodecDelay element (ID 0x56AA) with a 3-byte value: nanoseconds of Opus encoder delay.
CODEC_DELAY = b"\x56\xaa\x83"


def codec_delay_ns(data: bytes) -> int | None:
    """A Matroska file's CodecDelay in nanoseconds (the fixtures write it with a 3-byte value), or None."""
    at = data.find(CODEC_DELAY)
    return None if at < 0 else int.from_bytes(data[at + 3 : at + 6], "big")


def opus_pre_skip(path: str) -> int:
    """The pre-skip of an Opus stream's OpusHead (48 kHz samples)."""
    import av

    with av.open(path) as container:
        head = container.streams.audio[0].codec_context.extradata
    assert head.startswith(b"OpusHead")
    return int.from_bytes(head[10:12], "little")


def samples_trimmed_by_the_libraries(path: str) -> int:
    """48 kHz samples PyAV's FFmpeg gives with its own trimming (what the loader did before)."""
    import av

    with av.open(path) as container:
        return sum(frame.samples for frame in container.decode(audio=0))


@pytest.fixture(scope="module")
def matroska_opus_files(tmp_path_factory) -> dict[str, str]:
    """Opus in WebM/Matroska whose CodecDelay is not the OpusHead pre-skip.

    The ffmpeg program (5.1), encoding with libopus from audio below 48 kHz, writes the pre-skip at the input
    rate read as 48 kHz (from 16 kHz: 2.17 ms for a pre-skip of 312 samples, 6.5 ms); the rest are a PyAV-written
    file (whose CodecDelay is right) with CodecDelay rewritten: absent, zero, and longer than the pre-skip.
    """
    import soxr

    directory = tmp_path_factory.mktemp("matroska_opus")
    d = str(directory)
    mono = synth(SPEECH, sr=16000)
    source = f"{d}/speech 16 kHz.wav"
    sf.write(source, np.stack([mono, 0.4 * mono[::-1]], axis=1), 16000, subtype="PCM_16")
    files = {}

    def ffmpeg(name: str, *options: str) -> None:
        files[name] = f"{d}/{name}"
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", source, *options, files[name]], check=True)

    ffmpeg("ffmpeg 16 kHz stereo.webm", "-c:a", "libopus")
    ffmpeg("ffmpeg 16 kHz mono.mka", "-ac", "1", "-c:a", "libopus")
    ffmpeg(
        "ffmpeg 8 kHz 2.5 ms frames.webm",
        "-ar",
        "8000",
        "-ac",
        "1",
        "-c:a",
        "libopus",
        "-frame_duration",
        "2.5",
    )
    ffmpeg("ffmpeg 24 kHz mono.webm", "-ar", "24000", "-ac", "1", "-c:a", "libopus")
    written = encode(f"{d}/pyav.webm", soxr.resample(mono, 16000, 48000).astype(np.float32), 48000, "webm",
                     "libopus", video="libvpx-vp9")  # fmt: skip
    with open(written, "rb") as handle:
        data = handle.read()
    at = data.find(CODEC_DELAY)
    assert at > 0 and codec_delay_ns(data) == 6_500_000  # the pre-skip, 312 samples at 48 kHz
    for name, element in (
        ("CodecDelay 2.17 ms", CODEC_DELAY + (2_166_667).to_bytes(3, "big")),
        ("CodecDelay 12.5 ms", CODEC_DELAY + (12_500_000).to_bytes(3, "big")),
        ("CodecDelay 0", CODEC_DELAY + bytes(3)),
        ("no CodecDelay", b"\xec\x84" + bytes(4)),  # an EBML Void element of the same size in its place
    ):
        files[f"pyav, {name}.webm"] = f"{d}/pyav, {name}.webm"
        with open(files[f"pyav, {name}.webm"], "wb") as handle:
            handle.write(data[:at] + element + data[at + 6 :])
    return files


def test_webm_and_matroska_opus_load_as_the_official_loader_loads_them(official_utils, matroska_opus_files):
    """The official loader (FFmpeg's program) trims an Opus stream's start by its OpusHead pre-skip whatever
    the Matroska CodecDelay says; FFmpeg's libraries trimmed CodecDelay, so a file whose CodecDelay is not the
    pre-skip decoded shifted (208 samples at 48 kHz from the ffmpeg program's 16 kHz WebM: 69 at 16 kHz)."""
    shifted = 0
    for name, path in matroska_opus_files.items():
        with open(path, "rb") as handle:
            delay = codec_delay_ns(handle.read())
        pre_skip = opus_pre_skip(path)
        assert delay is None or delay != round(pre_skip * 1e9 / 48000), name  # the case this test is about
        reference = official_utils.normalize_audio_input(path)
        ours = audio.load_audio(path)
        assert ours.shape == reference.shape, name
        assert np.abs(ours - reference).max() <= LOAD_TOLERANCE, name
        assert np.abs(ours).max() > 0.05, name
        with open(path, "rb") as handle:
            np.testing.assert_array_equal(audio.load_audio(handle.read()), ours)
        # Negative control: the libraries' own trim keeps a different number of samples whenever CodecDelay
        # is set to something else than the pre-skip.
        official_48k = int(official_utils.load_audio_any(path)[0].shape[-1])
        library_48k = samples_trimmed_by_the_libraries(path)
        if delay:
            shifted += 1
            assert library_48k - official_48k == pre_skip - round(delay * 48000 / 1e9), name
    assert shifted == 6


def test_transcriptions_are_identical_to_those_of_the_official_loaders_samples(
    official_utils, container_files
):
    from qasr_jax.asr import Qwen3ASRModel
    from tests.test_asr import cached_small_checkpoint

    model = Qwen3ASRModel.from_pretrained(cached_small_checkpoint(), max_new_tokens=12)
    names = ["m4a (AAC)", "mp4 video (H.264 + AAC)", "webm video (VP9 + Opus)", "amr (AMR-NB, 8 kHz)"]
    paths = [container_files[name] for name in names]
    references = [(official_utils.normalize_audio_input(path), 16000) for path in paths]
    ours = model.transcribe(paths, language="English")
    theirs = model.transcribe(references, language="English")
    for name, a, b in zip(names, ours, theirs):
        assert a.error is None and b.error is None, name
        assert (a.language, a.text) == (b.language, b.text), name


def test_unusable_inputs_get_typed_errors_naming_them_and_the_batch_goes_on(container_files, tmp_path):
    from qasr_jax.asr import Qwen3ASRModel
    from tests.test_asr import cached_small_checkpoint

    silent_video = tmp_path / "silent.mp4"
    import av

    with av.open(str(silent_video), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for index in range(10):
            frame = av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")
            frame.pts = index
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    empty_streams = {}
    for ext in ("wav", "m4a"):  # a header and an audio stream with no samples
        empty_streams[ext] = str(tmp_path / f"no samples.{ext}")
        subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "0",
                        empty_streams[ext]], check=True)  # fmt: skip
    zero_length = tmp_path / "empty.m4a"
    zero_length.write_bytes(b"")
    not_audio = tmp_path / "report.mp4"
    not_audio.write_bytes(b"%PDF-1.4\n" + bytes(range(256)) * 40)
    good = container_files["m4a (AAC)"]

    cases = [
        (str(silent_video), AudioDecodeError, "no audio stream"),
        (empty_streams["wav"], EmptyAudioError, "no samples"),
        (empty_streams["m4a"], AudioDecodeError, "no audio stream"),
        (str(zero_length), EmptyAudioError, "empty"),
        (str(not_audio), AudioDecodeError, "cannot decode"),
        (str(tmp_path / "absent.webm"), AudioFileNotFoundError, "no such"),
    ]
    for path, kind, message in cases:
        with pytest.raises(kind, match=message) as error:
            audio.load_audio(path)
        assert path in str(error.value)
    seconds = len(audio.load_audio(good)) / 16000
    with pytest.raises(AudioTooLongError, match=f"{good}.*longer than"):
        audio.load_audio(good, max_seconds=seconds / 2)
    assert len(audio.load_audio(good, max_seconds=seconds + 1)) == int(seconds * 16000)

    model = Qwen3ASRModel.from_pretrained(cached_small_checkpoint(), max_new_tokens=4, max_audio_seconds=60.0)
    long_audio = (np.zeros(16000 * 61, np.float32), 16000)
    results = model.transcribe([good, *(path for path, _, _ in cases), long_audio, good], language="English")
    assert results[0].error is None and results[-1].error is None and results[0].text == results[-1].text
    for result, (path, kind, _) in zip(results[1:-2], cases):
        assert isinstance(result.error, kind) and path in str(result.error)
    assert isinstance(results[-2].error, AudioTooLongError) and f"item {len(cases) + 1}" in str(
        results[-2].error
    )


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


def _handler(directory: str):
    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/slow"):
                time.sleep(3.0)
            return super().do_GET()

        def log_message(self, *args):
            pass

    return functools.partial(Handler, directory=directory)


@pytest.fixture()
def local_server(container_files):
    """An HTTP server on 127.0.0.1 serving the container fixtures' directory."""
    directory = os.path.dirname(container_files["m4a (AAC)"])
    server = _Server(("127.0.0.1", 0), _handler(directory))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_urls_are_fetched_with_a_size_limit_a_timeout_and_clear_errors(
    local_server, container_files, monkeypatch
):
    path = container_files["m4a (AAC)"]
    expected = audio.load_audio(path)
    url = f"{local_server}/{os.path.basename(path)}"
    np.testing.assert_array_equal(audio.load_audio(url), expected)
    with pytest.raises(AudioDecodeError, match="HTTP 404") as error:
        audio.load_audio(f"{local_server}/absent.wav")
    assert "absent.wav" in str(error.value)
    monkeypatch.setattr(audio_files, "MAX_URL_BYTES", os.path.getsize(path) - 1)
    with pytest.raises(AudioDecodeError, match="limit"):
        audio.load_audio(url)
    monkeypatch.setattr(audio_files, "URL_TIMEOUT_SECONDS", 0.5)
    with pytest.raises(AudioDecodeError, match="cannot fetch"):
        audio.load_audio(f"{local_server}/slow/{os.path.basename(path)}")
    with pytest.raises(AudioDecodeError, match="cannot fetch"):
        audio.load_audio("http://127.0.0.1:9/nothing-listens-here.wav")


def test_base64_strings_and_data_uris_decode_as_the_file_does(official_utils, container_files, speech_wav):
    for path in (container_files["m4a (AAC)"], speech_wav):
        with open(path, "rb") as handle:
            encoded = base64.b64encode(handle.read()).decode("ascii")
        expected = audio.load_audio(path)
        np.testing.assert_array_equal(audio.load_audio(encoded), expected)
        np.testing.assert_array_equal(audio.load_audio(f"data:audio/mp4;base64,{encoded}"), expected)
    # The official loader reads a WAV data URI (libsndfile formats only): the same samples.
    reference = official_utils.normalize_audio_input(f"data:audio/wav;base64,{encoded}")
    np.testing.assert_allclose(reference, expected, atol=LOAD_TOLERANCE)
    with pytest.raises(InvalidAudioError, match="base64"):
        audio.load_audio("data:audio/wav;base64,@@@not base64@@@")
    with pytest.raises(InvalidAudioError, match="data URI"):
        audio.load_audio("data:audio/wav,plain")
    # Errors name the item, not kilobytes of base64.
    with pytest.raises(AudioDecodeError) as error:
        audio.load_audio(base64.b64encode(b"not audio at all " * 40).decode("ascii"))
    assert len(str(error.value)) < 600 and "(base64)" in str(error.value)


def test_cli_reads_stdin_and_headerless_pcm(container_files, tmp_path, monkeypatch, capsys):
    import json

    from infer import transcribe as cli
    from tests.test_asr import cached_small_checkpoint

    model = cached_small_checkpoint()
    wav = synth_wav("Read from a pipe.")
    samples = audio.load_audio(wav)
    raw = tmp_path / "speech.s16le"
    raw.write_bytes(np.round(samples * 32767).astype("<i2").tobytes())
    m4a = container_files["m4a (AAC)"]
    common = ["--model", model, "--max-new-tokens", "6", "--language", "English", "--format", "jsonl",
              "--no-progress"]  # fmt: skip

    def run(args, stdin: bytes | None = None):
        if stdin is not None:
            monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        assert cli.main([*args, *common]) == 0
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    with open(m4a, "rb") as handle:
        piped = run(["-"], handle.read())
    from_file = run([m4a])
    assert piped[0]["text"] == from_file[0]["text"] and piped[0]["language"] == from_file[0]["language"]
    pcm_file = run([str(raw), "--raw-pcm", "16000"])
    pcm_piped = run(["-", "--raw-pcm", "16000"], raw.read_bytes())
    from qasr_jax.asr import Qwen3ASRModel

    direct = Qwen3ASRModel.from_pretrained(model, max_new_tokens=6).transcribe(
        (np.round(samples * 32767).astype(np.float32) / 32768, 16000), language="English"
    )[0]
    assert pcm_file[0]["text"] == pcm_piped[0]["text"] == direct.text
    # An odd byte count is not 16-bit PCM: that item fails, named, and the exit status says so.
    odd = tmp_path / "odd.s16le"
    odd.write_bytes(b"\x00\x01\x02")
    assert cli.main([str(odd), str(raw), "--raw-pcm", "16000", *common]) == 1
    captured = capsys.readouterr()
    assert "odd.s16le" in captured.err and "odd number of bytes" in captured.err
    assert json.loads(captured.out.splitlines()[1])["text"] == direct.text
