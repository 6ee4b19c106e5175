"""Audio input: any source to 16 kHz mono float32, the Whisper-style log-mel front end, long-audio splitting.

Three stages, each matching the official Qwen3-ASR pipeline numerically:

- ``load_audio``: decode (``audio_files``: libsndfile, else FFmpeg), average channels, resample (soxr), peak-normalise and clip to [-1, 1].
- ``log_mel``: 128-bin log-mel features in JAX over a padded batch, every item exactly as if it were alone
  (in the official processor the batch's zero padding leaks into a shorter item's last frame and its mask
  counts one frame more; here it does not). ``features`` builds such a batch from a list of waveforms.
- ``split_audio``: cut long audio near a target length at the quietest 100 ms window.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from qasr_jax import audio_files
from qasr_jax.errors import AudioTooLongError, EmptyAudioError, InvalidAudioError

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
N_MELS = 128
MEL_MAX_HZ = 8000.0
# The official pipeline zero-pads split pieces shorter than this.
MIN_PIECE_SECONDS = 0.5
# split_audio looks this far either side of the nominal cut for the quietest point: a piece can be this much longer.
SPLIT_SEARCH_SECONDS = 5.0

# A path, URL, base64 string or data URI, an encoded file's bytes, or (samples, sample_rate) with samples [time] or [time, channels] /
# [channels, time].
AudioSource = str | os.PathLike | bytes | bytearray | memoryview | tuple


# --------------------------------------------------------------------------------------------------------------
# Loading


def load_audio(
    source: AudioSource, *, name: str | None = None, max_seconds: float | None = None
) -> np.ndarray:
    """Decode ``source`` to mono 16 kHz float32 samples in [-1, 1].

    ``source`` is one of:

    - a file path: WAV, FLAC, Ogg, MP3, AIFF and the rest of libsndfile's formats, and through FFmpeg's
      libraries every other container and codec (m4a/AAC, mp4/mkv/webm video, opus, amr, ...);
    - an ``http(s)://`` URL, a ``data:`` URI or a base64 string of such a file;
    - the bytes of such a file;
    - a ``(samples, sample_rate)`` tuple, samples [time] or [time, channels] / [channels, time].

    The steps are those of the official input normalisation:

    1. Decode. Files give float samples in [-1, 1] (``qasr_jax.audio_files``). Arrays are taken at their numeric
       values: an integer array is not rescaled by its type's range (the peak normalisation of step 4 brings it
       into range instead).
    2. Average the channels. For a 2-D array the channel axis is the first one when it has at most 8 entries and
       is shorter than the second, otherwise the last one (so both [channels, time] and [time, channels] work).
    3. Resample to 16 kHz with soxr (high quality); the result has ceil(n · 16000 / rate) samples.
    4. If the peak magnitude exceeds 1, divide by it; clip to [-1, 1].

    ``name`` labels the input in error messages; by default it is the path or URL, ``"<bytes>"``, ``"<array>"``,
    or ``"<input> (base64)"``. ``max_seconds`` refuses longer audio (checked while decoding).
    Returns samples [time] float32.

    Raises AudioFileNotFoundError (missing file), AudioDecodeError (unreadable, not audio, no audio stream,
    truncated, a URL that cannot be fetched), EmptyAudioError (no samples), AudioTooLongError (over
    ``max_seconds``), InvalidAudioError (NaN/Inf samples, arrays that are not 1-D or 2-D, sample rates that are
    not positive and finite, invalid base64).
    """
    if isinstance(source, (str, os.PathLike)):
        label = name if name is not None else audio_files.describe(source, "<input>")
        data = audio_files.read_source(source, label)
        mono = audio_files.decode(data, label, SAMPLE_RATE, max_seconds)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        label = name if name is not None else "<bytes>"
        mono = audio_files.decode(bytes(source), label, SAMPLE_RATE, max_seconds)
    elif isinstance(source, tuple) and len(source) == 2:
        label = name if name is not None else "<array>"
        samples = _channels_last(_as_sample_array(source[0], label), label)
        sample_rate = _checked_sample_rate(source[1], label)
        if samples.shape[0] == 0 or samples.shape[1] == 0:
            raise EmptyAudioError(f"{label}: the audio has no samples (shape {samples.shape})")
        if not np.all(np.isfinite(samples)):
            raise InvalidAudioError(f"{label}: the audio contains NaN or Inf samples")
        if max_seconds is not None and samples.shape[0] > max_seconds * sample_rate:
            raise AudioTooLongError(f"{label}: the audio is longer than the {max_seconds:g} s limit")
        mono = samples[:, 0] if samples.shape[1] == 1 else np.mean(samples, axis=1)
        mono = audio_files.resample(mono, sample_rate, SAMPLE_RATE)
    else:
        label = name if name is not None else "<input>"
        raise InvalidAudioError(
            f"{label}: expected a path, URL, base64 string, bytes or a (samples, sample_rate) tuple, "
            f"got {type(source).__name__}"
        )
    if mono.shape[0] == 0:
        raise EmptyAudioError(f"{label}: the audio has no samples")
    if not np.all(np.isfinite(mono)):
        raise InvalidAudioError(f"{label}: the audio contains NaN or Inf samples")
    return _peak_normalise(mono)


def _as_sample_array(samples: object, label: str) -> np.ndarray:
    try:
        array = np.asarray(samples)
    except (TypeError, ValueError) as error:
        raise InvalidAudioError(f"{label}: samples are not a numeric array ({error})") from error
    if array.dtype == np.bool_ or not (
        np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    ):
        raise InvalidAudioError(f"{label}: samples must be real numbers, got dtype {array.dtype}")
    return array


def _channels_last(array: np.ndarray, label: str) -> np.ndarray:
    """[time] or [time, channels] or [channels, time] → [time, channels], keeping float64 input in float64."""
    dtype = np.float64 if array.dtype == np.float64 else np.float32
    array = array.astype(dtype, copy=False)
    if array.ndim == 1:
        return array[:, None]
    if array.ndim == 2:
        # Few rows and more columns than rows reads as [channels, time] (the official rule).
        if array.shape[0] <= 8 and array.shape[1] > array.shape[0]:
            return array.T
        return array
    raise InvalidAudioError(
        f"{label}: samples must be 1-D [time] or 2-D [time, channels]/[channels, time], got shape {array.shape}"
    )


def _checked_sample_rate(sample_rate: object, label: str) -> float:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float, np.integer, np.floating)):
        raise InvalidAudioError(f"{label}: the sample rate must be a number, got {sample_rate!r}")
    if not np.isfinite(sample_rate) or sample_rate <= 0:
        raise InvalidAudioError(f"{label}: the sample rate must be positive and finite, got {sample_rate!r}")
    return float(sample_rate)


def _peak_normalise(samples: np.ndarray) -> np.ndarray:
    samples = samples.astype(np.float32, copy=False)
    peak = float(np.max(np.abs(samples)))
    if peak > 1.0:
        samples = samples / np.float32(peak)
    return np.ascontiguousarray(np.clip(samples, -1.0, 1.0), dtype=np.float32)


# --------------------------------------------------------------------------------------------------------------
# Log-mel features


def num_frames(num_samples: int) -> int:
    """Feature frames for ``num_samples`` samples at 16 kHz (the official attention mask's sum for that item)."""
    return int(num_samples) // HOP_LENGTH


def _hz_to_slaney_mel(hz: np.ndarray) -> np.ndarray:
    # Linear (3 mel per 200 Hz) below 1 kHz, logarithmic above: 27 mel per factor 6.4.
    linear = 3.0 * hz / 200.0
    logarithmic = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) * (27.0 / np.log(6.4))
    return np.where(hz >= 1000.0, logarithmic, linear)


def _slaney_mel_to_hz(mel: np.ndarray) -> np.ndarray:
    linear = 200.0 * mel / 3.0
    logarithmic = 1000.0 * np.exp((mel - 15.0) * (np.log(6.4) / 27.0))
    return np.where(mel >= 15.0, logarithmic, linear)


@functools.lru_cache(maxsize=1)
def mel_filters() -> np.ndarray:
    """Slaney-scale, area-normalised triangular filters, [n_fft // 2 + 1, n_mels] float32, 0–8000 Hz."""
    n_bins = N_FFT // 2 + 1
    bin_hz = np.linspace(0.0, SAMPLE_RATE // 2, n_bins)
    edges_hz = _slaney_mel_to_hz(
        np.linspace(_hz_to_slaney_mel(np.array(0.0)), _hz_to_slaney_mel(np.array(MEL_MAX_HZ)), N_MELS + 2)
    )
    lower, center, upper = edges_hz[:-2], edges_hz[1:-1], edges_hz[2:]
    rising = (bin_hz[:, None] - lower) / (center - lower)
    falling = (upper - bin_hz[:, None]) / (upper - center)
    triangles = np.maximum(0.0, np.minimum(rising, falling))
    # Scale each filter by 2 / bandwidth so every band carries about the same energy.
    return (triangles * (2.0 / (upper - lower))).astype(np.float32)


def _hann_window() -> np.ndarray:
    # Periodic Hann (as torch.hann_window), the window the STFT of the reference uses.
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)


def _reflect_index(index: jax.Array, length: jax.Array) -> jax.Array:
    """Map positions outside [0, length) back inside by mirroring about the end samples (numpy "reflect")."""
    period = jnp.maximum(2 * (length - 1), 1)
    folded = jnp.mod(index, period)
    mirrored = jnp.where(folded < length, folded, period - folded)
    return jnp.where(length > 1, mirrored, 0)


@functools.partial(jax.jit, static_argnames=("frames",))
def log_mel(
    waveforms: jax.Array, lengths: jax.Array, frames: int | None = None, frequency_scale: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Whisper-style log-mel features of a padded batch, each item computed on its own samples only.

    waveforms: [batch, samples] float32 at 16 kHz; samples past an item's length are ignored.
    lengths: [batch] int, each item's sample count (clamped to [0, samples]).
    frames: output frame count (static); default samples // 160.

    frequency_scale: [batch] factors (training augmentation only; None for the exact features): each item's
    power spectrum is stretched along the frequency axis by its factor before the mel filters (bin k reads the
    power at k / factor, linearly interpolated, zero past 8 kHz), as a vocal tract that much shorter would move
    its formants (vocal-tract-length perturbation).

    Returns (mel [batch, 128, frames] float32, num_frames [batch] int32). Item i has lengths[i] // 160 valid
    frames, equal to what the official processor gives for that item as a batch of one: centred STFT (n_fft 400,
    hop 160, periodic Hann) reflecting at the item's own ends, power spectrum, slaney mel, log10 floored at
    1e-10, clamp at the item's own max − 8, then (x + 4) / 4. Frames past num_frames[i] are zero.
    """
    batch, width = waveforms.shape
    out_frames = width // HOP_LENGTH if frames is None else frames
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, width)

    # The centred signal for frame t is x[t·hop − n_fft/2 : t·hop + n_fft/2], with out-of-range positions
    # reflected at the item's own ends. Gather it once per item as hop-sized blocks: frame t is blocks
    # t, t+1 and the first 80 samples of t+2 (n_fft = 2.5 hops), which avoids a [batch, frames, n_fft] gather.
    n_blocks = out_frames + 2
    positions = jnp.arange(n_blocks * HOP_LENGTH, dtype=jnp.int32) - N_FFT // 2
    sources = _reflect_index(positions[None, :], lengths[:, None])
    centred = jnp.take_along_axis(waveforms.astype(jnp.float32), jnp.clip(sources, 0, width - 1), axis=1)
    blocks = centred.reshape(batch, n_blocks, HOP_LENGTH)
    tail = N_FFT - 2 * HOP_LENGTH
    windows = jnp.concatenate(
        [blocks[:, :out_frames], blocks[:, 1 : out_frames + 1], blocks[:, 2 : out_frames + 2, :tail]], axis=-1
    )  # [batch, frames, n_fft]

    spectrum = jnp.fft.rfft(windows * _hann_window(), axis=-1)  # [batch, frames, n_fft // 2 + 1]
    power = jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2
    if frequency_scale is not None:
        power = _scale_frequencies(power, frequency_scale)
    mel = jnp.einsum("btf,fm->bmt", power, mel_filters(), precision=jax.lax.Precision.HIGHEST)
    log_spec = jnp.log10(jnp.maximum(mel, 1e-10))

    item_frames = lengths // HOP_LENGTH
    valid = jnp.arange(out_frames)[None, None, :] < item_frames[:, None, None]  # [batch, 1, frames]
    item_max = jnp.max(jnp.where(valid, log_spec, -jnp.inf), axis=(1, 2), keepdims=True, initial=-jnp.inf)
    log_spec = jnp.maximum(log_spec, item_max - 8.0)
    return jnp.where(valid, (log_spec + 4.0) / 4.0, 0.0), item_frames


def _scale_frequencies(power: jax.Array, scale: jax.Array) -> jax.Array:
    """``power [batch, frames, bins]`` with bin k of item b read at k / scale[b] (linear interpolation; 0 beyond
    the last bin)."""
    bins = power.shape[-1]
    source = jnp.arange(bins, dtype=jnp.float32)[None, :] / scale.astype(jnp.float32)[:, None]  # [batch, bins]
    low = jnp.clip(jnp.floor(source).astype(jnp.int32), 0, bins - 1)
    high = jnp.clip(low + 1, 0, bins - 1)
    frac = (source - low)[:, None, :]
    lower = jnp.take_along_axis(power, low[:, None, :], axis=-1)
    upper = jnp.take_along_axis(power, high[:, None, :], axis=-1)
    inside = (source <= bins - 1)[:, None, :]
    return jnp.where(inside, lower + frac * (upper - lower), 0.0)


def features(wavs: list[np.ndarray], *, pad_to_multiple: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Log-mel features of a list of 16 kHz waveforms as one padded batch (what the model's encoder takes).

    wavs: B arrays [samples_i] float32.
    pad_to_multiple: round the frame count up to a multiple of this (few distinct shapes, few compilations).

    Returns (input_features [B, 128, T] float32, feature_attention_mask [B, T] int32) with
    T = max_i samples_i // 160 (rounded up); item i's features are exactly ``log_mel`` of it alone.
    """
    if not wavs:
        raise ValueError("features() needs at least one waveform")
    for index, wav in enumerate(wavs):
        if np.ndim(wav) != 1:
            raise InvalidAudioError(
                f"item {index}: a waveform must be 1-D [samples], got shape {np.shape(wav)}"
            )
    lengths = np.array([len(wav) for wav in wavs], dtype=np.int32)
    frames = int(lengths.max()) // HOP_LENGTH
    if pad_to_multiple:
        frames = -(-frames // pad_to_multiple) * pad_to_multiple
    # One hop more than the frames covers every item's samples (an item may have up to 159 past its last
    # frame's hop) and depends only on the frame count, so a frame bucket is also a sample-width bucket.
    width = max((frames + 1) * HOP_LENGTH, int(lengths.max()))
    batch = np.zeros((len(wavs), width), dtype=np.float32)
    for index, wav in enumerate(wavs):
        batch[index, : len(wav)] = wav
    mel, item_frames = log_mel(jnp.asarray(batch), jnp.asarray(lengths), frames=frames)
    mask = (np.arange(frames)[None, :] < np.asarray(item_frames)[:, None]).astype(np.int32)
    return np.asarray(mel, dtype=np.float32), mask


# --------------------------------------------------------------------------------------------------------------
# Long-audio splitting


@dataclasses.dataclass(frozen=True)
class AudioPiece:
    """One piece of a split waveform.

    samples: [n] float32 — the input's samples[start : start + num_samples], followed by zeros up to 0.5 s when
        the piece is shorter than that and the input was split (the official pipeline pads such pieces).
    start: index of the piece's first sample in the input.
    num_samples: how many input samples the piece holds (``samples[:num_samples]``); the pieces' unpadded
        samples concatenate back to the input exactly.
    sample_rate: samples per second.
    """

    samples: np.ndarray
    start: int
    num_samples: int
    sample_rate: int

    @property
    def offset_seconds(self) -> float:
        """Where the piece starts in the input, in seconds."""
        return self.start / self.sample_rate

    @property
    def unpadded(self) -> np.ndarray:
        """The input samples this piece holds, without padding: [num_samples]."""
        return self.samples[: self.num_samples]


def split_audio(
    wav: np.ndarray,
    max_seconds: float,
    *,
    sr: int = SAMPLE_RATE,
    search_seconds: float = SPLIT_SEARCH_SECONDS,
    window_ms: float = 100.0,
) -> list[AudioPiece]:
    """Split [samples] audio into pieces of about ``max_seconds``, cutting where it is quietest.

    Audio no longer than ``max_seconds`` is returned whole (one piece, never padded). Otherwise, repeatedly:
    from the current start, look at ±``search_seconds`` around start + max_seconds, find the ``window_ms``
    window with the smallest sum of |samples| (the first if tied), cut at that window's quietest sample, and go
    on from there. Pieces shorter than 0.5 s are then zero-padded to 0.5 s. The cut points are those of the
    official ``split_audio_into_chunks`` for the same arguments.
    """
    samples = np.asarray(wav, dtype=np.float32)
    if samples.ndim != 1:
        raise InvalidAudioError(f"split_audio: the waveform must be 1-D [samples], got shape {samples.shape}")
    if not max_seconds > 0 or int(max_seconds * sr) < 1:
        raise ValueError(f"split_audio: max_seconds must cover at least one sample, got {max_seconds}")
    if sr <= 0:
        raise ValueError(f"split_audio: the sample rate must be positive, got {sr}")

    total = samples.shape[0]
    if total / float(sr) <= max_seconds:
        return [AudioPiece(samples, 0, total, sr)]

    target = int(max_seconds * sr)
    reach = int(search_seconds * sr)
    window = max(4, int(window_ms / 1000.0 * sr))
    starts = [0]
    while total - starts[-1] > target:
        start = starts[-1]
        nominal = start + target
        cut = quietest_point(
            samples, max(start, nominal - reach), min(total, nominal + reach), window, nominal
        )
        starts.append(min(max(cut, start + 1), total))

    min_samples = int(MIN_PIECE_SECONDS * sr)
    pieces = []
    for start, end in zip(starts, [*starts[1:], total]):
        piece = samples[start:end]
        if piece.shape[0] < min_samples:
            piece = np.pad(piece, (0, min_samples - piece.shape[0]))
        pieces.append(AudioPiece(piece, start, end - start, sr))
    return pieces


def quietest_point(samples: np.ndarray, lo: int, hi: int, window: int, fallback: int) -> int:
    """Index of the quietest sample inside the quietest ``window``-sample stretch of samples[lo:hi]."""
    if hi - lo <= window:
        return fallback
    magnitude = np.abs(samples[lo:hi])
    # A float32 moving sum by np.convolve: the same arithmetic as the official rule, so near-ties between
    # windows resolve to the same cut.
    window_sums = np.convolve(magnitude, np.ones(window, dtype=np.float32), mode="valid")
    quietest_window = int(np.argmin(window_sums))
    return lo + quietest_window + int(np.argmin(magnitude[quietest_window : quietest_window + window]))
