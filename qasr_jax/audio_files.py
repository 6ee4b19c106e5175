"""Audio sources to decoded samples: paths, URLs, base64 strings, ``data:`` URIs, bytes and raw PCM.

``decode_source`` returns a source's samples as mono float32 at the file's own sample rate, decoded as the
official pipeline decodes them:

- libsndfile (``soundfile``) first: WAV, FLAC, Ogg/Vorbis, Ogg/Opus, MP3, AIFF, ... give float samples;
- every other container and codec (m4a/AAC, mp4/mkv/webm video, amr, opus in WebM, ...) through FFmpeg's
  libraries (PyAV): the first audio stream, converted to 16-bit PCM and scaled by 1/32768, which is what the
  official loader's FFmpeg fallback produces.

Files are read block by block and mixed to mono per block, so an hour of 44.1 kHz stereo is never held as a
whole stereo array. Files that end early are refused (``AudioDecodeError``): WAV, FLAC and Ogg by their exact
header sizes, MP3 by its frame structure (a last frame cut short, or fewer frames than its Xing/VBRI header
counts).
"""

from __future__ import annotations

import base64
import binascii
import io
import mmap
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import IO

import numpy as np
import soundfile
import soxr

from qasr_jax.errors import (
    AudioDecodeError,
    AudioFileNotFoundError,
    AudioTooLongError,
    EmptyAudioError,
    InvalidAudioError,
)

# Frames decoded per block when reading a file.
BLOCK_FRAMES = 1 << 18
# URLs: the most bytes fetched and the seconds allowed without progress.
MAX_URL_BYTES = 1 << 30
URL_TIMEOUT_SECONDS = 30.0
# A string longer than this that is valid base64 (and names no file) is read as base64 audio, as in the official
# loader.
MIN_BASE64_CHARS = 256
_BASE64 = re.compile(r"^[A-Za-z0-9+/\s]+={0,2}\s*$")


# --------------------------------------------------------------------------------------------------------------
# Sources


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def describe(source: object, fallback: str) -> str:
    """How a source is named in messages: a path or URL as given, base64 and data URIs by their kind only."""
    if isinstance(source, os.PathLike):
        return os.fspath(source)
    if isinstance(source, str):
        if source.startswith("data:"):
            return f"{fallback} (data URI)"
        if len(source) > MIN_BASE64_CHARS and not os.path.exists(source) and _BASE64.match(source[:4096]):
            return f"{fallback} (base64)"
        return source
    return fallback


def read_source(source: str | os.PathLike, label: str) -> str | bytes:
    """A path to open, or the bytes a URL, a data URI or a base64 string stands for."""
    if isinstance(source, os.PathLike) or os.path.exists(source):
        return os.fspath(source)
    if source.startswith("data:"):
        header, sep, payload = source.partition(",")
        if not sep or ";base64" not in header:
            raise InvalidAudioError(f"{label}: a data URI must be 'data:<type>;base64,<data>'")
        return _b64decode(payload, label)
    if is_url(source):
        return fetch_url(source, label)
    if len(source) > MIN_BASE64_CHARS and _BASE64.match(source):
        return _b64decode(source, label)
    raise AudioFileNotFoundError(f"{label}: no such audio file")


def _b64decode(payload: str, label: str) -> bytes:
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidAudioError(f"{label}: invalid base64 audio data ({error})") from error


def fetch_url(url: str, label: str, max_bytes: int | None = None, timeout: float | None = None) -> bytes:
    """The body of an http(s) URL, refusing more than ``max_bytes`` and stalls longer than ``timeout`` s."""
    max_bytes = MAX_URL_BYTES if max_bytes is None else max_bytes
    timeout = URL_TIMEOUT_SECONDS if timeout is None else timeout
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise AudioDecodeError(
                    f"{label}: {declared} bytes is over the {max_bytes}-byte limit for URLs"
                )
            body = response.read(max_bytes + 1)
    except urllib.error.HTTPError as error:
        raise AudioDecodeError(f"{label}: the server answered HTTP {error.code} {error.reason}") from error
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise AudioDecodeError(f"{label}: cannot fetch the URL ({reason})") from error
    if len(body) > max_bytes:
        raise AudioDecodeError(f"{label}: the response is over the {max_bytes}-byte limit for URLs")
    return body


def raw_pcm(data: bytes, label: str) -> np.ndarray:
    """Headerless signed 16-bit little-endian mono PCM → float32 samples (scaled by 1/32768)."""
    if len(data) % 2:
        raise InvalidAudioError(f"{label}: raw s16le PCM has an odd number of bytes ({len(data)})")
    return np.frombuffer(data, "<i2").astype(np.float32) / np.float32(32768.0)


# --------------------------------------------------------------------------------------------------------------
# Decoding


def decode(data: str | bytes, label: str, rate_out: int, max_seconds: float | None = None) -> np.ndarray:
    """Mono float32 samples at ``rate_out`` from a path or a file's bytes.

    Resampling is soxr's high-quality filter, fed block by block (its output equals one call on the whole
    signal); the result has ``ceil(n · rate_out / rate)`` samples for ``n`` decoded at the file's ``rate``.
    """
    if isinstance(data, bytes) and not data:
        raise EmptyAudioError(f"{label}: the audio data is empty (0 bytes)")
    if isinstance(data, str):
        if os.path.isdir(data):
            raise AudioDecodeError(f"{label}: is a directory, not an audio file")
        if os.path.getsize(data) == 0:
            raise EmptyAudioError(f"{label}: the file is empty (0 bytes)")
    source = data if isinstance(data, str) else io.BytesIO(data)
    try:
        audio_file = soundfile.SoundFile(source)
    except soundfile.SoundFileError as error:
        # libsndfile names an in-memory file by its repr; the label names it in our message.
        sndfile_error = str(error).replace(f"Error opening {source!r}: ", "")
    else:
        with audio_file:
            try:
                return _read_soundfile(audio_file, data, label, rate_out, max_seconds)
            except soundfile.SoundFileError as error:
                raise AudioDecodeError(f"{label}: cannot decode audio ({error})") from error
    return _read_ffmpeg(data, label, rate_out, max_seconds, sndfile_error)


def resample(mono: np.ndarray, rate: float, rate_out: int) -> np.ndarray:
    """[n] at ``rate`` → [ceil(n · rate_out / rate)] at ``rate_out`` (soxr, high quality)."""
    if rate == rate_out:
        return mono
    resampled = soxr.resample(mono, rate, rate_out, quality="HQ")
    return _fit_length(resampled, mono.shape[0], rate, rate_out)


def _fit_length(resampled: np.ndarray, n: int, rate: float, rate_out: int) -> np.ndarray:
    # Same float expression as the official resampler's output length, so lengths agree to the sample.
    out_length = int(np.ceil(n * (float(rate_out) / rate)))
    if resampled.shape[0] >= out_length:
        return resampled[:out_length]
    # soxr's last partial output sample is dropped; the official length counts it, as a zero.
    return np.pad(resampled, (0, out_length - resampled.shape[0]))


def _collect(
    blocks: Iterator[np.ndarray], rate: float, rate_out: int, label: str, max_seconds: float | None
) -> np.ndarray:
    """Mix ``[time, channels]`` blocks to mono, resample them as they come and join the output, stopping as soon
    as the audio is over ``max_seconds``."""
    limit = None if max_seconds is None else int(np.ceil(max_seconds * rate))
    stream = (
        None if rate == rate_out else soxr.ResampleStream(rate, rate_out, 1, dtype="float32", quality="HQ")
    )
    parts, total = [], 0
    for block in blocks:
        mono = block[:, 0] if block.shape[1] == 1 else np.mean(block, axis=1)
        total += mono.shape[0]
        if limit is not None and total > limit:
            raise AudioTooLongError(f"{label}: the audio is longer than the {max_seconds:g} s limit")
        parts.append(mono if stream is None else stream.resample_chunk(mono, last=False))
    if stream is not None:
        parts.append(stream.resample_chunk(np.zeros((0,), np.float32), last=True))
    joined = np.concatenate(parts) if parts else np.zeros((0,), np.float32)
    return joined if stream is None else _fit_length(joined, total, rate, rate_out)


# libsndfile logs "data : <header size> (should be <bytes present>)" when a WAV's data chunk is cut short.
_WAV_DATA_SIZE_LOG = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
# Streamed WAVs carry these placeholders instead of a size; they are not truncation.
_WAV_UNKNOWN_SIZES = {0, 0xFFFFFFFF, 0x7FFFFFFF}


def _read_soundfile(
    audio_file: soundfile.SoundFile, data: str | bytes, label: str, rate_out: int, max_seconds: float | None
) -> np.ndarray:
    declared_frames = audio_file.frames
    rate = float(audio_file.samplerate)
    decoded = 0

    def blocks() -> Iterator[np.ndarray]:
        nonlocal decoded
        while True:
            block = audio_file.read(BLOCK_FRAMES, dtype="float32", always_2d=True)
            if block.shape[0] == 0:
                return
            decoded += block.shape[0]
            yield block

    samples = _collect(blocks(), rate, rate_out, label, max_seconds)
    if audio_file.format == "MP3":
        # libsndfile's MP3 frame count is an estimate from the first header; the frames themselves tell.
        problem = _mp3_file_truncation(data)
        if problem:
            raise AudioDecodeError(f"{label}: the MP3 file is truncated ({problem})")
        return samples
    log = audio_file.extra_info
    # libsndfile reads a cut-off file without complaint up to where the bytes stop; compare against what the
    # header promised so a partial recording is not transcribed as if it were whole.
    problem = None
    if decoded < declared_frames:
        problem = f"decoded {decoded} frames; the header promises {declared_frames}"
    for declared, present in _WAV_DATA_SIZE_LOG.findall(log):
        if int(declared) > int(present) and int(declared) not in _WAV_UNKNOWN_SIZES:
            problem = f"its data chunk declares {declared} bytes; {present} are present"
    # An Ogg stream cut mid-page leaves junk after its last whole page; one cut on a page boundary has no
    # end-of-stream mark.
    if "lacks an end-of-stream bit" in log or "Junk after the last page" in log:
        problem = "the Ogg stream ends without its end-of-stream page"
    if problem:
        raise AudioDecodeError(f"{label}: the {audio_file.format} file is truncated ({problem})")
    return samples


def _mp3_file_truncation(data: str | bytes) -> str | None:
    if isinstance(data, bytes):
        return mp3_truncation(data)
    with open(data, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        return mp3_truncation(mapped)


def _read_ffmpeg(
    data: str | bytes, label: str, rate_out: int, max_seconds: float | None, sndfile_error: str
) -> np.ndarray:
    import av

    source: str | IO[bytes] = data if isinstance(data, str) else io.BytesIO(data)
    try:
        container = av.open(source, mode="r")
    except av.FFmpegError as error:
        raise AudioDecodeError(
            f"{label}: cannot decode audio: neither libsndfile nor FFmpeg reads it ({sndfile_error}; "
            f"{getattr(error, 'strerror', None) or error})"
        ) from error
    with container:
        if not container.streams.audio:
            kinds = sorted({stream.type for stream in container.streams})
            held = f"only {', '.join(kinds)}" if kinds else "no streams at all"
            raise AudioDecodeError(f"{label}: has no audio stream (it holds {held})")
        stream = container.streams.audio[0]
        rate = float(stream.codec_context.sample_rate or stream.rate or 0)
        if rate <= 0:
            raise AudioDecodeError(f"{label}: the audio stream has no sample rate")
        try:
            return _collect(_ffmpeg_blocks(container, stream), rate, rate_out, label, max_seconds)
        except av.FFmpegError as error:
            raise AudioDecodeError(f"{label}: cannot decode the audio stream ({error})") from error


def _ffmpeg_blocks(container: object, stream: object) -> Iterator[np.ndarray]:
    """[time, channels] float32 blocks: each decoded frame as packed 16-bit PCM at its own rate and layout."""
    import av

    resampler = av.AudioResampler(format="s16")
    scale = np.float32(1.0 / 32768.0)
    trim = _MatroskaOpusTrim.of(container, stream)

    def convert(frames: list) -> Iterator[np.ndarray]:
        for frame in frames:
            pcm = frame.to_ndarray()  # packed s16: [1, time · channels]
            channels = len(frame.layout.channels)
            yield pcm.reshape(-1, channels).astype(np.float32) * scale

    for frame in container.decode(stream):  # type: ignore[attr-defined]
        blocks = convert(resampler.resample(frame))
        if trim is None:
            yield from blocks
            continue
        # A format-only conversion is sample for sample, so the frame's trim applies to what it converts to.
        front, back = trim.frame_trim(frame)
        pcm = np.concatenate(list(blocks) or [np.zeros((0, len(frame.layout.channels)), np.float32)])
        yield pcm[front : pcm.shape[0] - back]
    yield from convert(resampler.resample(None))


class _MatroskaOpusTrim:
    """The start and end trim of an Opus stream in Matroska/WebM, as the official loader's FFmpeg trims it.

    An Opus stream starts with the encoder's pre-skip (48 kHz samples in the codec's OpusHead header) that a
    decoder drops. Matroska also carries it as the track's CodecDelay. The FFmpeg program on the official
    loader's path (audioread; FFmpeg 5.1 here) drops the OpusHead pre-skip whatever CodecDelay says; the FFmpeg
    libraries in the PyAV wheel (8.x) drop CodecDelay when it is set. Both agree on what most muxers write, but
    FFmpeg 5.1's own Matroska muxer, fed Opus from audio below 48 kHz, writes the pre-skip at the input rate
    read as 48 kHz (16 kHz input: 104 samples, 2.17 ms, for a pre-skip of 312): the libraries then keep 208
    samples of encoder delay, 69 at 16 kHz, 4.3 ms late. So the decoder is told to leave trimming to us
    (``skip_manual``): the stream's start loses the pre-skip, and each frame's end loses the padding its side
    data names (the last frame's DiscardPadding), as FFmpeg's decoder trims them.
    """

    def __init__(self, pre_skip: int) -> None:
        self.pending = pre_skip  # start samples still to drop

    @classmethod
    def of(cls, container: object, stream: object) -> _MatroskaOpusTrim | None:
        from av.codec.context import Flags2

        context = stream.codec_context  # type: ignore[attr-defined]
        extradata = context.extradata or b""
        if (
            "matroska" not in container.format.name.split(",")  # type: ignore[attr-defined]
            or context.name != "opus"
            or not extradata.startswith(b"OpusHead")
            or len(extradata) < 12
        ):
            return None
        context.flags2 |= Flags2.skip_manual
        return cls(int.from_bytes(extradata[10:12], "little"))

    def frame_trim(self, frame: object) -> tuple[int, int]:
        """(samples to drop at the start, samples to drop at the end) of a decoded frame."""
        from av.sidedata.sidedata import Type

        samples = frame.samples  # type: ignore[attr-defined]
        front = min(self.pending, samples)
        self.pending -= front
        back = 0
        for side_data in frame.side_data:  # type: ignore[attr-defined]
            if side_data.type == Type.SKIP_SAMPLES:
                # uint32 LE samples to skip at the start (the container's delay, replaced by the pre-skip
                # above), then uint32 LE samples to discard at the end.
                back = int.from_bytes(bytes(side_data)[4:8], "little")
        # FFmpeg ignores an end discard longer than what is left of the frame (FFmpeg's own Opus encoder writes
        # one), on both paths.
        return front, back if back <= samples - front else 0


# --------------------------------------------------------------------------------------------------------------
# MP3 structure

_MP3_BITRATES = {  # kbit/s by (MPEG-1?, layer) and index 1..14
    (True, 1): (32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    (False, 3): (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MP3_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}  # by version id


def _mp3_frame(header: bytes) -> tuple[int, bool, int, int] | None:
    """(frame bytes, MPEG-1?, channel mode, layer) of a 4-byte frame header, or None if it is not one."""
    if len(header) < 4 or header[0] != 0xFF or (header[1] & 0xE0) != 0xE0:
        return None
    version = (header[1] >> 3) & 3
    layer = 4 - ((header[1] >> 1) & 3)
    bitrate_index = header[2] >> 4
    rate_index = (header[2] >> 2) & 3
    if version == 1 or layer == 4 or bitrate_index in (0, 15) or rate_index == 3:
        return None  # reserved values; free-format frames (index 0) carry no length
    mpeg1 = version == 3
    bitrate = _MP3_BITRATES[(mpeg1, layer)][bitrate_index - 1] * 1000
    rate = _MP3_RATES[version][rate_index]
    padding = (header[2] >> 1) & 1
    if layer == 1:
        size = (12 * bitrate // rate + padding) * 4
    elif layer == 3 and not mpeg1:
        size = 72 * bitrate // rate + padding
    else:
        size = 144 * bitrate // rate + padding
    return size, mpeg1, header[3] >> 6, layer


def _mp3_payload(data: bytes) -> tuple[int, int]:
    """[start, end) of the frames: after ID3v2 tags, before ID3v1/APEv2 tags."""
    start = 0
    while data[start : start + 3] == b"ID3" and len(data) >= start + 10:
        size = 0
        for byte in data[start + 6 : start + 10]:
            size = (size << 7) | (byte & 0x7F)
        start += 10 + size + (10 if data[start + 5] & 0x10 else 0)
    end = len(data)
    changed = True
    while changed:
        changed = False
        if end - start >= 128 and data[end - 128 : end - 125] == b"TAG":
            end -= 128
            changed = True
        if end - start >= 32 and data[end - 32 : end - 24] == b"APETAGEX":
            size = int.from_bytes(data[end - 20 : end - 16], "little")
            flags = int.from_bytes(data[end - 12 : end - 8], "little")
            end -= size + (32 if flags & 0x80000000 else 0)
            changed = True
    return start, max(end, start)


def _mp3_declared_frames(data: bytes, position: int, mpeg1: bool, mode: int, layer: int) -> int | None:
    """Frames counted by a Xing/Info or VBRI header in the frame at ``position`` (excluding that frame)."""
    if layer != 3:
        return None
    side_info = (32 if mode != 3 else 17) if mpeg1 else (17 if mode != 3 else 9)
    xing = position + 4 + side_info
    if data[xing : xing + 4] in (b"Xing", b"Info"):
        flags = int.from_bytes(data[xing + 4 : xing + 8], "big")
        if flags & 1:
            return int.from_bytes(data[xing + 8 : xing + 12], "big")
        return None
    vbri = position + 36
    if data[vbri : vbri + 4] == b"VBRI":
        return int.from_bytes(data[vbri + 14 : vbri + 18], "big")
    return None


def mp3_truncation(data: bytes | mmap.mmap) -> str | None:
    """Why an MP3 file's frames show it was cut short, or None when they end whole.

    Walks the frame headers from the first pair of consecutive valid frames: the file is truncated when the last
    frame extends past the end of the data, or when fewer frames follow an Xing/Info/VBRI header than it counts.
    Bytes between frames that do not parse (rare junk) are skipped by searching for the next frame.
    """
    start, end = _mp3_payload(data)
    position = _first_frame(data, start, end)
    if position is None:
        return None  # nothing this walker understands (e.g. free format); libsndfile decoded it
    first = _mp3_frame(data[position : position + 4])
    assert first is not None
    declared = _mp3_declared_frames(data, position, first[1], first[2], first[3])
    frames = 0
    while position < end:
        frame = _mp3_frame(data[position : position + 4])
        if frame is None:
            if end - position < 4:
                if data[position] == 0xFF:
                    return f"{end - position} bytes of a frame header at byte {position}"
                break
            following = _first_frame(data, position + 1, end)
            if following is None:
                break
            position = following
            continue
        if position + frame[0] > end:
            return f"the frame at byte {position} needs {frame[0]} bytes; {end - position} remain"
        frames += 1
        position += frame[0]
    if declared is not None and frames - 1 < declared:
        return f"{frames - 1} audio frames where its header counts {declared}"
    return None


def _first_frame(data: bytes, start: int, end: int) -> int | None:
    """The first offset ≥ start holding a frame header followed by another one (or by the end)."""
    position = data.find(b"\xff", start, end)
    while position != -1 and position + 4 <= end:
        frame = _mp3_frame(data[position : position + 4])
        if frame is not None:
            following = position + frame[0]
            if following >= end or _mp3_frame(data[following : following + 4]) is not None:
                return position
        position = data.find(b"\xff", position + 1, end)
    return None


__all__ = [
    "BLOCK_FRAMES",
    "MAX_URL_BYTES",
    "URL_TIMEOUT_SECONDS",
    "decode",
    "describe",
    "fetch_url",
    "is_url",
    "mp3_truncation",
    "raw_pcm",
    "read_source",
    "resample",
]
