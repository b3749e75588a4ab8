"""Audio to what Megrez-3B-Omni's audio encoder (Whisper-large-v3's, as Qwen-Audio uses it) takes: decoding,
16 kHz mono, limits, 30 s chunks, Whisper's log-mel spectrogram and the encoder's frame and token counts.

Decoding is PyAV (FFmpeg inside the wheel); everything after it is numpy (no torch, no scipy at run time). The
rate conversion is ours rather than FFmpeg's so that it is the same on every platform and tested here. The
features match transformers' WhisperFeatureExtractor (to 1e-4), which matches OpenAI's Whisper.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..errors import MegrezError

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30  # Whisper's window: the encoder always sees 30 s, zero-padded
CHUNK_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE
CHUNK_FRAMES = CHUNK_SAMPLES // HOP_LENGTH
MAX_AUDIO_BYTES = 32 * 1024 * 1024
MAX_AUDIO_SECONDS = 300
MIN_AUDIO_SECONDS = 0.1
SILENCE_PEAK = 1e-3  # -60 dBFS

_MIN_SAMPLES = round(MIN_AUDIO_SECONDS * SAMPLE_RATE)

# The resampling filter: a Kaiser-windowed sinc reaching 24 zero crossings of the lower rate to each side,
# cut off at 92% of the lower Nyquist. Measured for 48 -> 16 kHz: flat (< 0.01 dB) to 6 kHz, -1.3 dB at 7 kHz,
# -32 dB at 8 kHz and below -100 dB from 8.5 kHz on, so almost nothing folds back into the mel bands.
_ZERO_CROSSINGS = 24
_ROLLOFF = 0.92
_KAISER_BETA = 10.0


class AudioError(MegrezError):
    """A clip that cannot be used: undecodable, too big, too long, too short, empty or silent."""


def _too_big(size: int, what: str = "the audio") -> AudioError:
    return AudioError(
        f"{what} is {size / 2**20:.1f} MiB; the limit is {MAX_AUDIO_BYTES >> 20} MiB "
        "(send a shorter or compressed clip)"
    )


def decode_audio(data: bytes) -> np.ndarray:
    """Bytes of an audio file in any format FFmpeg reads (its first audio stream) as float32 16 kHz mono in
    [-1, 1], checked with check_clip."""
    import av
    import av.logging

    if not data:
        raise AudioError("the audio clip is empty")
    if len(data) > MAX_AUDIO_BYTES:
        raise _too_big(len(data))
    # PyAV drops FFmpeg's log by default, but an application may have turned it on: a bad upload must not
    # print FFmpeg's complaints on the server's terminal.
    level = av.logging.get_level()
    av.logging.set_level(None)
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise AudioError(
                    "the audio could not be decoded (the file has no audio stream); "
                    "send WAV, FLAC, MP3, M4A or OGG"
                )
            # Only the sample format is converted (to planar float, one row per channel); the rate and the
            # layout stay those of the stream's first frame.
            resampler = av.AudioResampler(format="fltp")
            planes, rate = [], None
            for frame in container.decode(container.streams.audio[0]):
                for converted in resampler.resample(frame):
                    rate = converted.sample_rate
                    planes.append(converted.to_ndarray())
            planes += [converted.to_ndarray() for converted in resampler.resample(None)]
    except av.FFmpegError as err:
        raise AudioError(
            f"the audio could not be decoded ({err.strerror or err}); send WAV, FLAC, MP3, M4A or OGG"
        ) from None
    finally:
        av.logging.set_level(level)
    if rate is None:
        raise AudioError("the audio clip is empty")
    mono = np.concatenate(planes, axis=1).mean(axis=0, dtype=np.float64).astype(np.float32)
    # Clipped as Whisper's own loader clips, which has FFmpeg write 16-bit integers.
    samples = np.clip(resample(mono, rate), -1.0, 1.0)
    check_clip(samples)
    return samples


def read_audio_bytes(path: Path) -> bytes:
    """An audio file's bytes, refused before they are read when there are more than MAX_AUDIO_BYTES."""
    try:
        size = Path(path).stat().st_size
        if size > MAX_AUDIO_BYTES:
            raise _too_big(size, f"audio {path}")
        return Path(path).read_bytes()
    except OSError as err:
        raise AudioError(f"cannot read audio {path}: {err.strerror or err}") from None


def read_audio_file(path: Path) -> np.ndarray:
    """decode_audio of a file; errors name the file."""
    data = read_audio_bytes(path)
    try:
        return decode_audio(data)
    except AudioError as err:
        raise AudioError(f"{path}: {err}") from None


def _kaiser(x: np.ndarray) -> np.ndarray:
    """The Kaiser window at x half widths from its centre (zero beyond one)."""
    window = np.i0(_KAISER_BETA * np.sqrt(np.clip(1 - x * x, 0, None))) / np.i0(_KAISER_BETA)
    return np.where(np.abs(x) < 1, window, 0)


def resample(samples: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Samples at `rate` Hz as float32 at `target` Hz, round(len * target / rate) of them: band-limited
    interpolation with the filter above, polyphase over the gcd-reduced up/down factors."""
    samples = np.asarray(samples, dtype=np.float32)
    if rate == target:
        return samples
    gcd = math.gcd(rate, target)
    up, down = target // gcd, rate // gcd
    count = round(len(samples) * target / rate)
    scale = min(1.0, target / rate)  # the lower rate over the input rate: the filter's bandwidth
    cutoff, half_width = _ROLLOFF * scale, _ZERO_CROSSINGS / scale  # half width in input samples
    reach = math.ceil(half_width)
    # Output n lies at input position n*down/up: past input `floor` by the fraction ((n*down) % up) / up, its
    # phase. Outputs r, r+up, r+2up... share the phase of r and step `down` inputs apart, so each phase is one
    # strided dot product with its own taps, which meet inputs floor-reach+1 .. floor+reach.
    padded = np.pad(samples, reach)
    windows = sliding_window_view(padded, 2 * reach)
    offsets = np.arange(1 - reach, reach + 1)
    out = np.empty(count, dtype=np.float32)
    for r in range(min(up, count)):
        floor, phase = divmod(r * down, up)
        distance = phase / up - offsets
        taps = (cutoff * np.sinc(cutoff * distance) * _kaiser(distance / half_width)).astype(np.float32)
        # padded[floor + 1] is samples[floor - reach + 1]: output r's first input
        rows = windows[floor + 1 :: down][: len(range(r, count, up))]
        # einsum, not matmul: it walks the overlapping strided rows without copying them (measured 2-10x
        # faster here than matmul's fallback for arrays BLAS cannot take)
        out[r::up] = np.einsum("ij,j->i", rows, taps)
    return out


def check_clip(samples: np.ndarray) -> None:
    """Raise AudioError for a 16 kHz clip the model cannot use."""
    if len(samples) == 0:
        raise AudioError("the audio clip is empty")
    if not np.isfinite(samples).all():
        raise AudioError("the audio clip has non-finite samples (NaN or infinity); re-encode it")
    seconds = len(samples) / SAMPLE_RATE
    if len(samples) < _MIN_SAMPLES:
        raise AudioError(f"the audio clip is {seconds:.3f} s long; it must be at least {MIN_AUDIO_SECONDS} s")
    if seconds > MAX_AUDIO_SECONDS:
        raise AudioError(
            f"the audio clip is {seconds:.1f} s long; the limit is {MAX_AUDIO_SECONDS} s "
            "(split it or send a shorter clip)"
        )
    if np.abs(samples).max() < SILENCE_PEAK:
        raise AudioError("the audio clip is silent (its loudest sample is below -60 dBFS)")


def split_clip(samples: np.ndarray) -> list[np.ndarray]:
    """The clip as consecutive 30 s chunks (views), each encoded alone; a last remainder shorter than
    MIN_AUDIO_SECONDS is dropped, as it would add only a few nearly empty tokens."""
    chunks = [samples[start : start + CHUNK_SAMPLES] for start in range(0, len(samples), CHUNK_SAMPLES)]
    if len(chunks) > 1 and len(chunks[-1]) < _MIN_SAMPLES:
        chunks.pop()
    return chunks


# --- Whisper's features ------------------------------------------------------------------------------------


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above (27 mels per 6.4x)."""
    log_step = math.log(6.4) / 27
    return np.where(hz < 1000, 3 * hz / 200, 15 + np.log(np.maximum(hz, 1000) / 1000) / log_step)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    log_step = math.log(6.4) / 27
    return np.where(mel < 15, 200 * mel / 3, 1000 * np.exp(log_step * (mel - 15)))


@functools.cache
def mel_filters(n_mels: int) -> np.ndarray:
    """Whisper's [N_FFT//2+1, n_mels] float32 mel filter bank (librosa's default: Slaney's scale, triangles
    from 0 to 8 kHz, each scaled to unit area by Slaney's 2 / bandwidth)."""
    fft_hz = np.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    edges = _mel_to_hz(np.linspace(0, _hz_to_mel(np.float64(SAMPLE_RATE / 2)), n_mels + 2))  # 0 Hz is 0 mel
    rising = (fft_hz[:, None] - edges[None, :-2]) / np.diff(edges)[None, :-1]
    falling = (edges[None, 2:] - fft_hz[:, None]) / np.diff(edges)[None, 1:]
    triangles = np.maximum(0, np.minimum(rising, falling))
    filters = (triangles * (2 / (edges[2:] - edges[:-2]))[None, :]).astype(np.float32)
    filters.flags.writeable = False  # cached: every caller shares this array
    return filters


def log_mel_spectrogram(samples: np.ndarray, n_mels: int) -> np.ndarray:
    """Whisper's [n_mels, CHUNK_FRAMES] float32 features of a chunk of at most 30 s (zero-padded to 30 s)."""
    if len(samples) > CHUNK_SAMPLES:
        raise ValueError(f"a chunk has at most {CHUNK_SAMPLES} samples, not {len(samples)}; use split_clip")
    audio = np.zeros(CHUNK_SAMPLES, dtype=np.float64)
    audio[: len(samples)] = samples
    # A centered STFT: reflect N_FFT//2 at both ends so that frame i is centered on sample i*HOP_LENGTH; the
    # 3001st frame (centered on the end) is dropped, as Whisper drops it.
    padded = np.pad(audio, N_FFT // 2, mode="reflect")
    frames = sliding_window_view(padded, N_FFT)[::HOP_LENGTH][:CHUNK_FRAMES]
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic, as torch.hann_window
    power = np.abs(np.fft.rfft(frames * hann, axis=1)) ** 2
    log_mel = np.log10(np.maximum(power @ mel_filters(n_mels).astype(np.float64), 1e-10))
    log_mel = np.maximum(log_mel, log_mel.max() - 8.0)  # at most 80 dB below the loudest value
    return np.ascontiguousarray(((log_mel + 4.0) / 4.0).T, dtype=np.float32)


@dataclass(frozen=True)
class ClipFeatures:
    """One chunk as the audio encoder takes it."""

    mel: np.ndarray  # [2 * encoder_frames, n_mels] float32, time-major
    encoder_frames: int  # the encoder's sequence length (after its stride-2 convolution)
    tokens: int  # the prompt's audio tokens: encoder_frames pooled by 2, plus the begin and end embeddings
    seconds: float


def clip_features(chunk: np.ndarray, n_mels: int) -> ClipFeatures:
    """Qwen-Audio's (and so Megrez-3B-Omni's) cut of the 30 s spectrogram: only the frames the audio covers go
    through the encoder, rounded up to the even count its stride-2 convolution takes (so one frame of the zero
    padding can come along, as it does there)."""
    mel_len = len(chunk) // HOP_LENGTH
    encoder_frames = (mel_len - 1) // 2 + 1  # conv1 (k3 p1 s1) keeps the length; conv2 (k3 p1 s2) halves it
    spectrogram = log_mel_spectrogram(chunk, n_mels)
    return ClipFeatures(
        mel=np.ascontiguousarray(spectrogram[:, : 2 * encoder_frames].T),
        encoder_frames=encoder_frames,
        tokens=encoder_frames // 2 + 2,
        seconds=len(chunk) / SAMPLE_RATE,
    )
