"""Audio and video files in containers and codecs libsndfile does not read, written with PyAV's encoders (FFmpeg's
libraries in the wheel), for the audio loader's tests."""

from __future__ import annotations

from fractions import Fraction

import numpy as np


def encode(
    path: str,
    samples: np.ndarray,
    rate: int,
    container: str,
    codec: str,
    *,
    bit_rate: int | None = None,
    codec_rate: int | None = None,
    video: str | None = None,
    video_seconds: float | None = None,
    muxer_options: dict[str, str] | None = None,
    metadata: dict[str, str] | None = None,
) -> str:
    """Write ``samples`` ([time] or [time, channels] float32 at ``rate``) as ``codec`` in ``container``.

    ``codec_rate`` is the stream's rate (the encoder resamples to it); ``video`` adds a stream of black 64×48
    frames in that codec before the audio stream (``video_seconds`` long, default the audio's duration).
    """
    import av

    samples = np.asarray(samples, np.float32)
    if samples.ndim == 1:
        samples = samples[:, None]
    channels = samples.shape[1]
    layout = "mono" if channels == 1 else "stereo"
    with av.open(path, "w", format=container, options=muxer_options or {}) as out:
        for key, value in (metadata or {}).items():
            out.metadata[key] = value
        picture = None
        if video is not None:
            picture = out.add_stream(video, rate=10)
            picture.width, picture.height, picture.pix_fmt = 64, 48, "yuv420p"
        stream = out.add_stream(codec, rate=codec_rate or rate)
        stream.layout = layout
        if bit_rate:
            stream.bit_rate = bit_rate
        if picture is not None:
            seconds = video_seconds if video_seconds is not None else samples.shape[0] / rate
            black = np.zeros((48, 64, 3), np.uint8)
            for index in range(max(1, round(seconds * 10))):
                frame = av.VideoFrame.from_ndarray(black, format="rgb24")
                frame.pts, frame.time_base = index, Fraction(1, 10)
                for packet in picture.encode(frame):
                    out.mux(packet)
            for packet in picture.encode(None):
                out.mux(packet)
        pcm = np.clip(np.round(samples * 32767.0), -32768, 32767).astype(np.int16)
        step = 4096
        for start in range(0, pcm.shape[0], step):
            block = np.ascontiguousarray(pcm[start : start + step]).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(block, format="s16", layout=layout)
            frame.sample_rate = rate
            frame.pts, frame.time_base = start, Fraction(1, rate)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path
