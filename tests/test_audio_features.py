"""Audio features and decoding (megrez_mlc/omni/audio.py) against transformers' WhisperFeatureExtractor
and analytic signals: the log-mel spectrogram, the mel filters, the rate conversion, every container the
decoder should read, chunking and the clear errors."""

from __future__ import annotations

import io
import wave
from pathlib import Path

import av
import numpy as np
import pytest
from transformers import WhisperFeatureExtractor
from transformers.audio_utils import mel_filter_bank

from megrez_mlc.omni.audio import (
    SAMPLE_RATE,
    AudioError,
    clip_features,
    decode_audio,
    log_mel_spectrogram,
    mel_filters,
    read_audio_file,
    resample,
    split_clip,
)

SPEECH = Path(__file__).parent / "data" / "speech.flac"
FEATURE_TOLERANCE = 1e-4


def seconds_of(seconds: float, rate: int = SAMPLE_RATE) -> np.ndarray:
    return np.arange(round(seconds * rate)) / rate


def tone(freq: float, seconds: float, rate: int = SAMPLE_RATE, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * freq * seconds_of(seconds, rate))).astype(np.float32)


def signals() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    t = seconds_of(4.0)
    return {
        "tone": tone(440, 2.0),
        "two tones": (0.37 * np.sin(2 * np.pi * 300 * t) + 0.11 * np.sin(2 * np.pi * 3170 * t)).astype(
            np.float32
        ),
        "noise": (0.2 * rng.standard_normal(3 * SAMPLE_RATE)).astype(np.float32),
        "chirp": (0.4 * np.sin(2 * np.pi * (100 * t + 900 * t**2))).astype(np.float32),
        "quiet": tone(1000, 1.0, amplitude=2e-3),
        "exactly 30 s": tone(220, 30.0),
        "1.37 s": tone(523, 1.37),
        "speech": decode_audio(SPEECH.read_bytes()),
    }


@pytest.mark.parametrize("n_mels", [128, 80])
def test_features_equal_whisper_feature_extractor(n_mels: int) -> None:
    extractor = WhisperFeatureExtractor(feature_size=n_mels)
    for name, samples in signals().items():
        expected = extractor(samples, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]
        got = log_mel_spectrogram(samples, n_mels)
        assert got.shape == expected.shape == (n_mels, 3000)
        assert np.abs(got - expected).max() < FEATURE_TOLERANCE, name


@pytest.mark.parametrize("n_mels", [128, 80])
def test_mel_filters_equal_transformers(n_mels: int) -> None:
    expected = mel_filter_bank(
        num_frequency_bins=201,
        num_mel_filters=n_mels,
        min_frequency=0,
        max_frequency=8000,
        sampling_rate=SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    )
    np.testing.assert_allclose(mel_filters(n_mels), expected, atol=1e-6)


def test_clip_features_follow_the_encoder_frames() -> None:
    samples = tone(523, 1.37)  # 21920 samples: 137 mel frames
    features = clip_features(samples, 80)
    assert (features.encoder_frames, features.tokens, features.mel.shape) == (69, 36, (138, 80))
    assert features.mel.flags["C_CONTIGUOUS"] and features.seconds == pytest.approx(1.37)
    spectrogram = WhisperFeatureExtractor(feature_size=80)(
        samples, sampling_rate=SAMPLE_RATE, return_tensors="np"
    )
    np.testing.assert_allclose(features.mel, spectrogram.input_features[0][:, :138].T, atol=FEATURE_TOLERANCE)


def test_the_spoken_sample() -> None:
    samples = read_audio_file(SPEECH)
    assert len(samples) / SAMPLE_RATE == pytest.approx(3.438, abs=0.01)
    assert np.abs(samples).max() > 0.5 and samples.dtype == np.float32


# --- rate conversion ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampling_keeps_a_tone(rate: int) -> None:
    out = resample(tone(1000, 2.0, rate), rate)
    assert len(out) == 2 * SAMPLE_RATE
    expected = tone(1000, 2.0)
    assert np.abs(out - expected)[800:-800].max() < 1e-4  # away from the edges, where the filter runs off


def test_resampling_removes_what_16_khz_cannot_hold() -> None:
    assert np.abs(resample(tone(9000, 1.0, 48000), 48000)[500:-500]).max() < 1e-3  # above 8 kHz: gone
    assert resample(tone(440, 1.0), SAMPLE_RATE) is not None
    np.testing.assert_array_equal(resample(tone(440, 1.0), SAMPLE_RATE), tone(440, 1.0))
    assert len(resample(np.ones(1001, np.float32), 44100)) == round(1001 * SAMPLE_RATE / 44100)


# --- decoding ---------------------------------------------------------------------------------------------


def wav(channels: list[np.ndarray], rate: int = SAMPLE_RATE) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(len(channels))
        w.setsampwidth(2)
        w.setframerate(rate)
        frames = np.stack([np.round(c * 32767) for c in channels], axis=1).astype("<i2")
        w.writeframes(frames.tobytes())
    return out.getvalue()


def encoded(samples: np.ndarray, container: str, codec: str, rate: int = SAMPLE_RATE) -> bytes:
    """samples encoded with PyAV (FFmpeg's encoders)."""
    out = io.BytesIO()
    with av.open(out, "w", format=container) as file:
        stream = file.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples[None, :].astype(np.float32), format="flt", layout="mono")
        frame.sample_rate = rate
        for fmt in ("flt", "fltp", "s16", "s16p", "s32"):  # what each encoder takes
            if fmt in {f.name for f in stream.codec_context.codec.audio_formats}:
                break
        for converted in av.AudioResampler(format=fmt, layout="mono", rate=rate).resample(frame):
            for packet in stream.encode(converted):
                file.mux(packet)
        for packet in stream.encode(None):
            file.mux(packet)
    return out.getvalue()


def test_wav_mono_stereo_and_float() -> None:
    left, right = tone(440, 1.0, amplitude=0.6), tone(880, 1.0, amplitude=0.2)
    mono = decode_audio(wav([left]))
    np.testing.assert_allclose(mono, left, atol=2 / 32767)  # 16-bit rounding, read as x / 32768
    stereo = decode_audio(wav([left, right]))
    np.testing.assert_allclose(stereo, (left + right) / 2, atol=2 / 32767)  # channels mixed by the mean
    as_float = encoded(left, "wav", "pcm_f32le")
    np.testing.assert_allclose(decode_audio(as_float), left, atol=1e-7)
    upsampled = decode_audio(wav([tone(440, 1.0, 44100, 0.6)], 44100))
    assert np.abs(upsampled - left)[800:-800].max() < 1e-3


@pytest.mark.parametrize(
    "container,codec,tolerance",
    [
        ("flac", "flac", "exact"),
        ("mp3", "libmp3lame", "lossy"),
        ("ipod", "aac", "lossy"),
        ("ogg", "libopus", "lossy"),
    ],
)
def test_compressed_formats(container: str, codec: str, tolerance: str) -> None:
    rate = 48000 if codec == "libopus" else 44100 if codec != "flac" else SAMPLE_RATE
    source = tone(440, 2.0, rate, 0.5)
    got = decode_audio(encoded(source, container, codec, rate))
    expected = tone(440, 2.0, amplitude=0.5)
    if tolerance == "exact":
        np.testing.assert_allclose(got, expected, atol=2 / 32767)
        return
    assert abs(len(got) - len(expected)) < 0.1 * SAMPLE_RATE  # encoder delay and padding
    spectrum = np.abs(np.fft.rfft(got[4000:20000]))
    assert np.argmax(spectrum) * SAMPLE_RATE / 16000 == pytest.approx(440, abs=2)
    assert np.sqrt(np.mean(got[4000:20000] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.1)


# --- chunks and errors ------------------------------------------------------------------------------------


def test_long_clips_are_cut_into_30_second_chunks() -> None:
    def lengths(seconds):
        return [len(c) / SAMPLE_RATE for c in split_clip(np.ones(round(seconds * SAMPLE_RATE)))]

    assert lengths(65) == [30.0, 30.0, 5.0]
    assert lengths(60.05) == [30.0, 30.0]  # a 50 ms remainder is dropped
    assert lengths(12) == [12.0]


def test_bad_audio_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(AudioError, match="could not be decoded"):
        decode_audio(b"this is not audio, just words")
    with pytest.raises(AudioError, match="the audio clip is empty"):
        decode_audio(wav([np.zeros(0)]))
    with pytest.raises(AudioError, match=r"shorter than 0.1 s"):
        decode_audio(wav([tone(440, 0.05)]))
    with pytest.raises(AudioError, match="silent"):
        decode_audio(wav([np.zeros(SAMPLE_RATE)]))
    with pytest.raises(AudioError, match=r"is 301.0 s; the limit is 300 s"):
        decode_audio(wav([np.full(301 * 8000, 0.1)], 8000))
    with pytest.raises(AudioError, match=r"the limit is 32.0 MiB"):
        decode_audio(bytes(32 * 2**20 + 1))  # refused before any decoding
    with pytest.raises(AudioError, match=r"none.wav not found"):
        read_audio_file(tmp_path / "none.wav")
    big = tmp_path / "big.wav"
    with big.open("wb") as f:
        f.truncate(32 * 2**20 + 1)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read a file over the limit"))
    with pytest.raises(AudioError, match=r"big.wav is 32.0 MiB"):
        read_audio_file(big)
