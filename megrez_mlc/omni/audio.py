"""Audio for Megrez-3B-Omni's Whisper-large-v3 encoder, in numpy: decoding, 16 kHz mono, the log-mel
spectrogram, and what one 30-second chunk gives the encoder.

Files are decoded by FFmpeg (PyAV's wheel carries it): WAV, FLAC, MP3, M4A/AAC, OGG/Opus and whatever else
it reads. The rate conversion to 16 kHz is ours (a windowed-sinc polyphase filter), so every input takes the
same, tested path. The features are Whisper's: a centred 400-point STFT every 160 samples over the chunk
zero-padded to 30 seconds, Slaney-style mel filters, log10 floored 8 below the maximum, then (x + 4) / 4:
transformers' WhisperFeatureExtractor within float32 rounding.

How a chunk becomes encoder input follows Megrez-3B-Omni's processing (its audio encoder is Qwen-Audio's):
`len // 160` mel frames, `(frames - 1) // 2 + 1` encoder frames after the stride-2 convolution, the first
`2 x encoder frames` spectrogram frames as input, and `encoder frames // 2 + 2` embeddings out (average
pooling by 2, then the learned begin and end embeddings).
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MegrezError

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30  # Whisper's window
CHUNK_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE
CHUNK_FRAMES = CHUNK_SAMPLES // HOP_LENGTH
MAX_AUDIO_BYTES = 32 * 2**20
MAX_AUDIO_SECONDS = 300
MIN_AUDIO_SECONDS = 0.1  # shorter clips give fewer than 3 embeddings
SILENCE_PEAK = 1e-3  # -60 dBFS: a clip whose loudest sample is below it has nothing to hear
_RESAMPLE_ZEROS = 16  # zero crossings of the sinc on each side of a tap (the filter's length)
_RESAMPLE_CUTOFF = 0.94  # of the lower Nyquist frequency: the transition band ends below it
_KAISER_BETA = 8.6  # ~ -90 dB stopband


class AudioError(MegrezError):
    """A clip that cannot be used: undecodable, empty, too short or long, silent or too big."""


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def read_audio_bytes(path: Path) -> bytes:
    """An audio file's bytes, refused before reading when it is over MAX_AUDIO_BYTES."""
    try:
        size = path.stat().st_size
    except OSError:
        raise AudioError(f"audio file {path} not found") from None
    if not path.is_file():
        raise AudioError(f"audio file {path} is not a file")
    if size > MAX_AUDIO_BYTES:
        raise AudioError(f"audio file {path} is {_mib(size)}; the limit is {_mib(MAX_AUDIO_BYTES)}")
    return path.read_bytes()


def read_audio_file(path: Path) -> np.ndarray:
    """An audio file as 16 kHz mono float32 samples, checked (check_clip)."""
    data = read_audio_bytes(path)
    try:
        return decode_audio(data)
    except AudioError as err:
        raise AudioError(f"audio file {path}: {err}") from None


def decode_audio(data: bytes) -> np.ndarray:
    """Encoded audio (any container and codec FFmpeg reads) as 16 kHz mono float32 samples, checked."""
    import av

    if len(data) > MAX_AUDIO_BYTES:
        raise AudioError(f"the audio is {_mib(len(data))}; the limit is {_mib(MAX_AUDIO_BYTES)}")
    try:
        with av.logging.Capture(), av.open(io.BytesIO(data)) as container:
            if not container.streams.audio:
                raise AudioError("the file holds no audio stream; send WAV, FLAC, MP3, M4A or OGG")
            planar = av.AudioResampler(format="fltp")  # float planes, the source's layout and rate
            blocks, rate = [], SAMPLE_RATE
            for frame in container.decode(container.streams.audio[0]):
                rate = frame.sample_rate
                for converted in planar.resample(frame):
                    blocks.append(converted.to_ndarray())
            for converted in planar.resample(None):  # what the converter still holds
                blocks.append(converted.to_ndarray())
    except AudioError:
        raise
    except (av.FFmpegError, ValueError, OSError) as err:
        raise AudioError(f"the audio could not be decoded ({err}); send WAV, FLAC, MP3, M4A or OGG") from None
    samples = np.concatenate(blocks, axis=1).mean(axis=0) if blocks else np.zeros(0, np.float32)
    samples = resample(samples.astype(np.float32), rate) if samples.size else samples
    check_clip(samples)
    return samples


def check_clip(samples: np.ndarray) -> None:
    """Refuse a clip the model cannot use, in one line that says why."""
    seconds = len(samples) / SAMPLE_RATE
    if len(samples) == 0:
        raise AudioError("the audio clip is empty")
    if not np.isfinite(samples).all():
        raise AudioError("the audio clip holds NaN or infinite samples")
    if seconds < MIN_AUDIO_SECONDS:
        raise AudioError(f"the audio clip is {seconds * 1000:.0f} ms, shorter than {MIN_AUDIO_SECONDS} s")
    if seconds > MAX_AUDIO_SECONDS:
        raise AudioError(
            f"the audio clip is {seconds:.1f} s; the limit is {MAX_AUDIO_SECONDS} s: send a shorter clip"
        )
    if np.abs(samples).max() < SILENCE_PEAK:
        raise AudioError("the audio clip is silent (its loudest sample is below -60 dBFS)")


@functools.cache
def _resample_filter(up: int, down: int) -> tuple[np.ndarray, int]:
    """Polyphase taps [up, taps per phase] of a Kaiser-windowed sinc low-pass at `up` x the input rate,
    and the filter's half length."""
    cutoff = _RESAMPLE_CUTOFF / max(up, down)  # in cycles per sample at the upsampled rate, times 2
    half = math.ceil(_RESAMPLE_ZEROS / cutoff)
    n = np.arange(-half, half + 1, dtype=np.float64)
    taps = cutoff * np.sinc(cutoff * n) * np.kaiser(len(n), _KAISER_BETA) * up
    taps = np.concatenate([taps, np.zeros((-len(taps)) % up)])
    # phase p holds taps p, p + up, ...: the ones that meet input samples for outputs at offset p
    return taps.reshape(-1, up).T.copy(), half


def resample(samples: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited rate conversion (rational, polyphase): round(len x target / rate) samples."""
    if rate == target:
        return samples.astype(np.float32, copy=False)
    g = math.gcd(rate, target)
    up, down = target // g, rate // g
    phases, half = _resample_filter(up, down)
    out_len = round(len(samples) * target / rate)
    # output j sits at upsampled position j*down; tap k of the filter meets upsampled index j*down + half - k
    positions = np.arange(out_len, dtype=np.int64) * down + half
    phase, first = positions % up, positions // up  # input index of each output's first (newest) tap
    width = phases.shape[1]
    padded = np.concatenate([np.zeros(width, np.float64), samples.astype(np.float64), np.zeros(width)])
    out = np.empty(out_len, np.float32)
    step = 1 << 16
    for start in range(0, out_len, step):  # in blocks: the gathered window matrix stays small
        sl = slice(start, min(start + step, out_len))
        index = first[sl, None] - np.arange(width)[None, :] + width
        out[sl] = np.einsum("ij,ij->i", padded[index], phases[phase[sl]])
    return out


def split_clip(samples: np.ndarray) -> list[np.ndarray]:
    """30-second chunks; a last one shorter than MIN_AUDIO_SECONDS is dropped (under 3 embeddings)."""
    chunks = [samples[i : i + CHUNK_SAMPLES] for i in range(0, len(samples), CHUNK_SAMPLES)]
    if len(chunks) > 1 and len(chunks[-1]) < MIN_AUDIO_SECONDS * SAMPLE_RATE:
        chunks.pop()
    return chunks


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, np.float64)
    linear = hz * 3.0 / 200.0
    log = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) * 27.0 / np.log(6.4)
    return np.where(hz >= 1000.0, log, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, np.float64)
    return np.where(mel >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (mel - 15.0)), mel * 200.0 / 3.0)


@functools.cache
def mel_filters(n_mels: int) -> np.ndarray:
    """[N_FFT // 2 + 1, n_mels] triangular filters from 0 to 8 kHz, equally spaced in Slaney mels, each
    scaled to unit area (Slaney's normalisation)."""
    freqs = np.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), n_mels + 2))
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (freqs[:, None] - lower) / (centre - lower)
    falling = (upper - freqs[:, None]) / (upper - centre)
    filters = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (upper - lower))
    return filters.astype(np.float32)


@functools.cache
def _hann() -> np.ndarray:
    return np.hanning(N_FFT + 1)[:-1]  # periodic


def log_mel_spectrogram(samples: np.ndarray, n_mels: int) -> np.ndarray:
    """Whisper's features [n_mels, 3000] of one chunk of at most 30 seconds."""
    audio = np.zeros(CHUNK_SAMPLES, np.float64)
    audio[: min(len(samples), CHUNK_SAMPLES)] = samples[:CHUNK_SAMPLES]
    padded = np.pad(audio, N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH][:CHUNK_FRAMES]
    power = np.abs(np.fft.rfft(frames * _hann(), axis=1)) ** 2  # [frames, bins]; the last frame dropped
    mel = power @ mel_filters(n_mels).astype(np.float64)
    log = np.log10(np.maximum(mel, 1e-10))
    log = np.maximum(log, log.max() - 8.0)
    return ((log + 4.0) / 4.0).T.astype(np.float32)


@dataclass(frozen=True)
class ClipFeatures:
    mel: np.ndarray  # [2 x encoder_frames, n_mels] float32, time-major: audio_embed's input
    encoder_frames: int
    tokens: int  # embeddings audio_embed returns: begin, encoder_frames // 2, end
    seconds: float


def clip_features(chunk: np.ndarray, n_mels: int) -> ClipFeatures:
    """What the encoder takes for one chunk (at most 30 s; split_clip cuts longer clips)."""
    encoder_frames = (len(chunk) // HOP_LENGTH - 1) // 2 + 1
    mel = log_mel_spectrogram(chunk, n_mels)[:, : 2 * encoder_frames]
    return ClipFeatures(
        np.ascontiguousarray(mel.T), encoder_frames, encoder_frames // 2 + 2, len(chunk) / SAMPLE_RATE
    )
