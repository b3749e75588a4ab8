"""megrez_mlc/omni/audio.py against transformers' WhisperFeatureExtractor and mel_filter_bank, and against
analytic signals: the log-mel features, the mel filters, the rate conversion, every container and sample
layout the decoder should read, chunking, the encoder's frame counts and the one-line errors."""

from __future__ import annotations

import functools
import io
import wave
from pathlib import Path

import av
import numpy as np
import pytest
from transformers import WhisperFeatureExtractor
from transformers.audio_utils import mel_filter_bank

from megrez_mlc.omni.audio import (
    MAX_AUDIO_BYTES,
    SAMPLE_RATE,
    AudioError,
    check_clip,
    clip_features,
    decode_audio,
    log_mel_spectrogram,
    mel_filters,
    read_audio_file,
    resample,
    split_clip,
)

SPEECH = Path(__file__).parent / "data" / "speech.flac"  # espeak-ng; tests/data/README.md says how
SPEECH_SAMPLES = 34484  # 2.155 s
FEATURE_TOLERANCE = 1e-4
EDGE = 200  # output samples at each end where a resampled signal may differ (the filter runs off the clip)


def times(seconds: float, rate: int = SAMPLE_RATE) -> np.ndarray:
    return np.arange(round(seconds * rate)) / rate


def tone(freq: float, seconds: float, rate: int = SAMPLE_RATE, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * freq * times(seconds, rate))).astype(np.float32)


def chirp_at(t: np.ndarray) -> np.ndarray:
    """0.4 x a sweep up from 200 Hz by 900 Hz a second, at times t (seconds)."""
    return 0.4 * np.sin(2 * np.pi * (200 * t + 450 * t**2))


def chirp(seconds: float, rate: int = SAMPLE_RATE) -> np.ndarray:
    return chirp_at(times(seconds, rate)).astype(np.float32)


@functools.cache
def extractor(n_mels: int) -> WhisperFeatureExtractor:
    return WhisperFeatureExtractor(
        feature_size=n_mels, sampling_rate=SAMPLE_RATE, hop_length=160, chunk_length=30, n_fft=400
    )


def reference_features(samples: np.ndarray, n_mels: int) -> np.ndarray:
    return extractor(n_mels)(samples, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]


def signals() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    t = times(3.0)
    return {
        "tone": tone(440, 2.0),
        "two tones": (0.37 * np.sin(2 * np.pi * 300 * t) + 0.113 * np.sin(2 * np.pi * 3170 * t)).astype(
            np.float32
        ),
        "white noise": (0.2 * rng.standard_normal(3 * SAMPLE_RATE)).astype(np.float32),
        "chirp": chirp(4.0),
        "quiet": tone(1000, 1.0, amplitude=2e-3),  # -54 dBFS: above the silence threshold
        "exactly 30 s": tone(220, 30.0, amplitude=0.3),
        "1.37 s": tone(523, 1.37),  # 21920 samples, not a multiple of 160
        "speech": decode_audio(SPEECH.read_bytes()),
    }


@pytest.mark.parametrize("n_mels", [128, 80])
def test_features_equal_whisper_feature_extractor(n_mels: int) -> None:
    for name, samples in signals().items():
        got = log_mel_spectrogram(samples, n_mels)
        assert got.shape == (n_mels, 3000) and got.dtype == np.float32, name
        assert np.abs(got - reference_features(samples, n_mels)).max() < FEATURE_TOLERANCE, name


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
    got = mel_filters(n_mels)
    assert got.shape == (201, n_mels) and got.dtype == np.float32
    assert np.abs(got - expected).max() < 1e-6
    assert mel_filters(n_mels) is got  # computed once


def test_the_spoken_sample() -> None:
    samples = read_audio_file(SPEECH)
    assert len(samples) == SPEECH_SAMPLES and samples.dtype == np.float32
    assert np.abs(samples).max() > 0.5  # speech at a normal level, far from silent


@pytest.mark.parametrize("n_mels", [128, 80])
def test_clip_features_take_the_frames_the_audio_covers(n_mels: int) -> None:
    samples = tone(523, 1.37)  # 137 mel frames
    features = clip_features(samples, n_mels)
    assert (features.encoder_frames, features.tokens) == (69, 36)
    assert features.mel.shape == (138, n_mels) and features.mel.dtype == np.float32
    assert features.mel.flags["C_CONTIGUOUS"] and features.seconds == pytest.approx(1.37)
    # the 138th frame reaches into the zero padding, as the encoder's even frame count needs
    expected = reference_features(samples, n_mels)[:, :138].T
    assert np.abs(features.mel - expected).max() < FEATURE_TOLERANCE


# --- rate conversion ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampling_keeps_a_tone(rate: int) -> None:
    out = resample(tone(1000, 2.0, rate), rate)
    assert out.dtype == np.float32 and len(out) == 2 * SAMPLE_RATE
    assert np.abs(out - tone(1000, 2.0))[EDGE:-EDGE].max() < 1e-5


def test_resampling_at_16_khz_is_the_identity() -> None:
    samples = chirp(1.0)
    np.testing.assert_array_equal(resample(samples, SAMPLE_RATE), samples)


@pytest.mark.parametrize(
    "length,rate", [(1001, 44100), (7, 48000), (48001, 48000), (999, 8000), (12345, 22050)]
)
def test_resampled_length_is_rounded(length: int, rate: int) -> None:
    assert len(resample(np.ones(length, np.float32), rate)) == round(length * SAMPLE_RATE / rate)


def test_resampling_removes_what_16_khz_cannot_hold() -> None:
    out = resample(tone(9000, 1.0, 48000), 48000)  # would alias to 7 kHz
    assert np.abs(out[EDGE:-EDGE]).max() < 1e-4  # from 0.5: more than 70 dB down


# --- decoding -----------------------------------------------------------------------------------------------


def wav_bytes(channels: np.ndarray, rate: int = SAMPLE_RATE, width: int = 2) -> bytes:
    """[channels, samples] in [-1, 1] as a PCM WAV of `width`-byte integers, written by the stdlib."""
    full_scale = 2 ** (8 * width - 1) - 1
    interleaved = np.ascontiguousarray(np.round(np.asarray(channels, np.float64).T * full_scale), "<i4")
    out = io.BytesIO()
    with wave.open(out, "wb") as file:
        file.setnchannels(len(channels))
        file.setsampwidth(width)
        file.setframerate(rate)
        file.writeframes(interleaved.view(np.uint8).reshape(-1, 4)[:, :width].tobytes())  # the low bytes
    return out.getvalue()


def encoded(channels: np.ndarray, rate: int, container: str, codec: str) -> bytes:
    """[channels, samples] encoded by FFmpeg's encoders through PyAV."""
    layout = "mono" if len(channels) == 1 else "stereo"
    out = io.BytesIO()
    with av.open(out, "w", format=container) as file:
        stream = file.add_stream(codec, rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(channels, np.float32), format="fltp", layout=layout
        )
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            file.mux(packet)
    return out.getvalue()


def decoded_format(data: bytes) -> str:
    """The sample format FFmpeg's decoder gives for the file."""
    with av.open(io.BytesIO(data)) as file:
        return next(file.decode(audio=0)).format.name


@pytest.mark.parametrize("width", [2, 3, 4])
def test_integer_wav_mono(width: int) -> None:
    source = chirp(1.0)
    got = decode_audio(wav_bytes(source[None, :], width=width))
    assert got.dtype == np.float32 and len(got) == len(source)
    assert np.abs(got - source).max() < 1.5 / 2 ** (8 * width - 1) + 1e-7  # the integers' rounding


def test_float_wav() -> None:
    source = chirp(1.0)
    data = encoded(source[None, :], SAMPLE_RATE, "wav", "pcm_f32le")
    assert decoded_format(data) == "flt"
    assert np.abs(decode_audio(data) - source).max() < 1e-7


def test_stereo_is_mixed_to_the_mean_packed_and_planar() -> None:
    left, right = tone(440, 1.0, amplitude=0.6), tone(1000, 1.0, amplitude=0.2)
    packed = wav_bytes(np.stack([left, right]))  # interleaved 16-bit
    assert decoded_format(packed) == "s16"
    assert np.abs(decode_audio(packed) - (left + right) / 2).max() < 1.5 / 32767
    left44, right44 = tone(440, 1.0, 44100, 0.6), tone(1000, 1.0, 44100, 0.2)
    planar = encoded(np.stack([left44, right44]), 44100, "ipod", "alac")  # lossless, one plane per channel
    assert decoded_format(planar) == "s32p"
    assert np.abs(decode_audio(planar) - (left + right) / 2)[EDGE:-EDGE].max() < 1e-5


@pytest.mark.parametrize("rate", [8000, 44100, 48000])
def test_wav_at_other_rates_comes_out_at_16_khz(rate: int) -> None:
    got = decode_audio(wav_bytes(tone(1000, 1.0, rate)[None, :], rate))
    expected = tone(1000, 1.0)
    assert len(got) == len(expected)
    assert np.abs(got - expected)[EDGE:-EDGE].max() < 1e-4  # 16-bit rounding, then the filter


def test_flac_is_lossless() -> None:
    got = decode_audio(encoded(chirp(2.0, 44100)[None, :], 44100, "flac", "flac"))
    expected = chirp(2.0)
    assert len(got) == len(expected)
    assert np.abs(got - expected)[EDGE:-EDGE].max() < 1e-4


def chirp_delay(got: np.ndarray, max_lag: int = 800) -> tuple[float, float]:
    """The delay (in samples, to a sixteenth) at which a decoded 2 s chirp best matches the analytic one, and
    the correlation coefficient there. Codecs delay the signal, often by a fraction of a 16 kHz sample."""
    n = min(len(got), 2 * SAMPLE_RATE) - 2 * max_lag
    reference = chirp(2.0)[max_lag : max_lag + n].astype(np.float64)
    span = got[: n + 2 * max_lag].astype(np.float64)
    energy = np.concatenate([[0.0], np.cumsum(span**2)])
    size = 2 * len(span)  # room for the circular correlation not to wrap
    spectrum = np.fft.rfft(span, size) * np.conj(np.fft.rfft(reference, size))
    dots = np.fft.irfft(spectrum, size)[: 2 * max_lag + 1]  # span[k:k+n] @ reference, by FFT
    lag = int(np.argmax(dots / np.sqrt(energy[n:] - energy[:-n]))) - max_lag  # to the nearest sample

    inner = np.arange(max_lag, max_lag + n)
    decoded = got[inner].astype(np.float64)

    def correlation(delay: float) -> float:
        delayed = chirp_at((inner - delay) / SAMPLE_RATE)
        return float(decoded @ delayed / np.sqrt((decoded @ decoded) * (delayed @ delayed)))

    delay = max(lag + np.arange(-16, 17) / 16, key=correlation)
    return float(delay), correlation(delay)


@pytest.mark.parametrize(
    "container,codec,rate",
    [("mp3", "libmp3lame", 44100), ("ipod", "aac", 44100), ("ogg", "libopus", 48000)],
)
def test_lossy_formats(container: str, codec: str, rate: int) -> None:
    got = decode_audio(encoded(chirp(2.0, rate)[None, :], rate, container, codec))
    assert abs(len(got) - 2 * SAMPLE_RATE) < 0.1 * SAMPLE_RATE  # encoder delay and padding
    delay, correlation = chirp_delay(got)
    assert abs(delay) < 0.05 * SAMPLE_RATE and correlation > 0.999


# --- chunks and errors --------------------------------------------------------------------------------------


def test_long_clips_are_cut_into_30_second_chunks() -> None:
    def lengths(seconds: float) -> list[float]:
        return [len(chunk) / SAMPLE_RATE for chunk in split_clip(np.ones(round(seconds * SAMPLE_RATE)))]

    assert lengths(65) == [30.0, 30.0, 5.0]
    assert lengths(60.05) == [30.0, 30.0]  # the 50 ms remainder is dropped
    assert lengths(12) == [12.0]
    samples = np.arange(65 * SAMPLE_RATE, dtype=np.float32)
    np.testing.assert_array_equal(np.concatenate(split_clip(samples)), samples)  # consecutive, in order


def test_bad_clips_are_one_line_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def message(data: bytes) -> str:
        with pytest.raises(AudioError) as err:
            decode_audio(data)
        return str(err.value)

    assert message(b"RIFF....WAVEfmt not really audio").startswith("the audio could not be decoded (")
    assert message(b"not audio at all").endswith("); send WAV, FLAC, MP3, M4A or OGG")
    assert message(wav_bytes(np.zeros((1, 0)))) == "the audio clip is empty"
    assert message(wav_bytes(tone(440, 0.05)[None, :])) == (
        "the audio clip is 0.050 s long; it must be at least 0.1 s"
    )
    assert message(wav_bytes(np.zeros((1, SAMPLE_RATE)))) == (
        "the audio clip is silent (its loudest sample is below -60 dBFS)"
    )
    assert message(wav_bytes(np.zeros((1, 301 * 8000)), rate=8000)) == (  # 4.8 MB
        "the audio clip is 301.0 s long; the limit is 300 s (split it or send a shorter clip)"
    )
    with pytest.raises(AudioError, match="non-finite samples"):
        check_clip(np.array([0.5, np.nan] * SAMPLE_RATE, np.float32))

    monkeypatch.setattr(av, "open", lambda *args, **kwargs: pytest.fail("decoded bytes over the limit"))
    assert message(bytes(MAX_AUDIO_BYTES + 1)) == (
        "the audio is 32.0 MiB; the limit is 32 MiB (send a shorter or compressed clip)"
    )
    big = tmp_path / "big.wav"
    with big.open("wb") as file:
        file.truncate(MAX_AUDIO_BYTES + 2**20)  # sparse: nothing is written
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read a file over the limit"))
    with pytest.raises(AudioError) as err:
        read_audio_file(big)
    assert (
        str(err.value) == f"audio {big} is 33.0 MiB; the limit is 32 MiB (send a shorter or compressed clip)"
    )
    with pytest.raises(AudioError) as err:
        read_audio_file(tmp_path / "none.wav")
    assert str(err.value) == f"cannot read audio {tmp_path / 'none.wav'}: No such file or directory"


def test_ffmpeg_says_nothing_on_the_terminal(capfd: pytest.CaptureFixture[str]) -> None:
    level = av.logging.get_level()
    av.logging.set_level(av.logging.VERBOSE)  # as an application debugging PyAV might
    try:
        with pytest.raises(AudioError, match="could not be decoded"):
            decode_audio(b"RIFF....WAVEfmt not really audio" * 3)
        assert av.logging.get_level() == av.logging.VERBOSE  # given back
    finally:
        av.logging.set_level(level)
    assert capfd.readouterr().err == ""
