"""Megrez-3B-Omni's audio path: audio_embed and whole answers against the torch oracle (a Whisper encoder
written from the public description over transformers' WhisperFeatureExtractor), the placeholder layout,
long clips, bad clips, the chat session, the CLI and the OpenAI server (input_audio parts and
/v1/audio/transcriptions). The features themselves are checked in test_audio_features.py; the GPU targets
in test_omni.py."""

from __future__ import annotations

import base64
import io
import json
import re
import wave
from pathlib import Path

import httpx
import numpy as np
import pytest

from megrez_mlc.errors import MegrezError
from megrez_mlc.omni.audio import SAMPLE_RATE, clip_features, decode_audio, split_clip
from megrez_mlc.runtime import Engine
from megrez_mlc.runtime.chat import ChatSession
from megrez_mlc.runtime.engine import PromptTooLong
from megrez_mlc.runtime.media import MediaError, audio_file_part, content_with_media

from .conftest import run_cli
from .omni_oracle import OmniOracle
from .test_omni import chat_with_lines, data_uri, image_part, picture, slice_batch

SPEECH = Path(__file__).parent / "data" / "speech.flac"  # espeak-ng; tests/data/README says how it was made
MAX_NEW = 12
ASR_PROMPT = "将语音转化为文字。"


def tone_clip(seconds: float, seed: int) -> np.ndarray:
    """A voiced-sounding clip: a wobbling fundamental with harmonics and a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    phase = 2 * np.pi * ((150 + 20 * seed) * t + 2 * np.sin(2 * np.pi * 3 * t))
    voice = sum(np.sin(k * phase) / k for k in range(1, 7))
    return (0.2 * voice + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def wav_bytes(samples: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return out.getvalue()


def audio_part(data: bytes, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def decoded(data: bytes) -> np.ndarray:
    """What the engine hears: the clip decoded as any input_audio part is (16-bit rounding included)."""
    return decode_audio(data)


@pytest.fixture(scope="module")
def engine(omni_built) -> Engine:
    model = omni_built("q0f32")
    return Engine(model.model_dir, model.lib, max_batch_size=2)


def greedy_params(engine: Engine):
    return engine.default_sampling(max_tokens=MAX_NEW, temperature=0.0, repetition_penalty=1.0)


def oracle_answer(engine: Engine, oracle: OmniOracle, prompt: list[int], rows: list[np.ndarray]) -> list[int]:
    rows = np.concatenate(rows)
    positions = [i for i, token in enumerate(prompt) if token < 0]
    assert len(positions) == len(rows)
    return oracle.greedy(prompt, dict(zip(positions, rows)), MAX_NEW)


# Largest error relative to the largest value: q0f32 and q4f32_1 keep the audio weights in float32 (measured
# 1e-6), q4f16_1 in float16 (measured 4e-3).
EMBED_TOLERANCE = {"q0f32": 3e-5, "q4f16_1": 2e-2}


@pytest.mark.parametrize("quantization", list(EMBED_TOLERANCE))
def test_audio_embeddings_match_the_oracle(omni_built, oracle: OmniOracle, quantization: str) -> None:
    model = omni_built(quantization)
    engine = Engine(model.model_dir, model.lib, max_batch_size=1)
    for samples in (decode_audio(SPEECH.read_bytes()), tone_clip(1.37, seed=1)):
        features = clip_features(samples, 80)
        got = engine.model.audio_embed(features.mel)
        expected = oracle.encode_clip(samples)
        assert got.shape == expected.shape == (features.tokens, 264)
        error = np.abs(got - expected).max() / np.abs(expected).max()
        assert error < EMBED_TOLERANCE[quantization], (quantization, len(samples), error)


def test_a_spoken_question_answers_as_the_oracle(engine: Engine, oracle: OmniOracle) -> None:
    data = SPEECH.read_bytes()
    prompt = engine.encode_chat([{"role": "user", "content": [audio_part(data, "flac")]}])
    answer = engine.generate(prompt, greedy_params(engine))
    assert answer.token_ids == oracle_answer(engine, oracle, prompt, [oracle.encode_clip(decoded(data))])


def test_an_image_and_a_clip_answer_as_the_oracle(engine: Engine, oracle: OmniOracle) -> None:
    image, clip = picture(260, 150, seed=31), wav_bytes(tone_clip(3.3, seed=2))
    content = [
        image_part(data_uri(image)),
        audio_part(clip),
        {"type": "text", "text": "What do you see and hear?"},
    ]
    prompt = engine.encode_chat([{"role": "user", "content": content}])
    label = engine.tokenizer.encode("Audio 1: ")  # the first clip, whatever images come before it
    assert any(prompt[i : i + len(label)] == label for i in range(len(prompt)))
    rows = [oracle.encode_slice(p) for p in slice_batch(engine, image)] + [oracle.encode_clip(decoded(clip))]
    answer = engine.generate(prompt, greedy_params(engine))
    assert answer.token_ids == oracle_answer(engine, oracle, prompt, rows)


def test_the_audio_placeholder_layout(engine: Engine) -> None:
    """ "Audio N: ", then per 30-second chunk audio_start + fillers + audio_end, then a newline; the fillers
    take the begin row, one row per 80 ms and the end row."""
    tok = engine.tokenizer
    start, end = tok.token_to_id("<|audio_start|>"), tok.token_to_id("<|audio_end|>")
    first, second = wav_bytes(tone_clip(2.0, seed=3)), wav_bytes(tone_clip(1.0, seed=4))
    content = [audio_part(first), audio_part(second), {"type": "text", "text": "Which is higher?"}]
    prompt = engine.encode_chat([{"role": "user", "content": content}])
    label = tok.encode("Audio 1: ")
    at = next(i for i in range(len(prompt)) if prompt[i : i + len(label)] == label)
    body = ["F" if t < 0 else t for t in prompt[at:]]
    # 2 s: 200 mel frames, 100 encoder frames, 50 rows + begin + end; 1 s: 25 + 2
    expected = [*tok.encode("Audio 1: "), start, *(["F"] * 52), end, *tok.encode("\nAudio 2: ")]
    expected += [start, *(["F"] * 27), end, *tok.encode("\nWhich is higher?")]
    assert body[: len(expected)] == expected
    again = engine.encode_audio(decoded(first))
    assert (
        again.seconds == 0.0 and [t for t in again.prompt_ids if t < 0] == [t for t in prompt if t < 0][:52]
    )


def test_a_clip_over_30_seconds_is_cut_into_chunks(engine: Engine, oracle: OmniOracle) -> None:
    samples = tone_clip(31.0, seed=5)
    chunks = split_clip(samples)
    assert [len(c) / SAMPLE_RATE for c in chunks] == [30.0, 1.0]
    encoded = engine.encode_audio(samples)
    start = engine.tokenizer.token_to_id("<|audio_start|>")
    assert encoded.chunks == 2 and encoded.prompt_ids.count(start) == 2
    assert len(encoded.prompt_ids) == (750 + 2 + 2) + (25 + 2 + 2)
    rows = engine.model.media.rows(np.array([t for t in encoded.prompt_ids if t < 0]))
    expected = np.concatenate([oracle.encode_clip(chunk) for chunk in chunks])
    assert np.abs(rows - expected).max() / np.abs(expected).max() < 3e-5


def test_bad_clips_are_clear_errors(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    def ask(part: dict) -> None:
        engine.encode_chat([{"role": "user", "content": [part, {"type": "text", "text": "?"}]}])

    with pytest.raises(MediaError, match="could not be decoded"):
        ask(audio_part(b"RIFF....WAVEfmt not really audio"))
    with pytest.raises(MediaError, match="not valid base64"):
        ask({"type": "input_audio", "input_audio": {"data": "@@@", "format": "wav"}})
    with pytest.raises(MediaError, match="needs"):
        ask({"type": "input_audio", "input_audio": "clip.wav"})
    with pytest.raises(MediaError, match="empty"):
        ask(audio_part(wav_bytes(np.zeros(0, np.float32))))
    with pytest.raises(MediaError, match="silent"):
        ask(audio_part(wav_bytes(np.zeros(SAMPLE_RATE, np.float32))))
    long = [audio_part(wav_bytes(tone_clip(31.0, seed=s))) for s in (10, 11)]  # 2 x 783 tokens
    with pytest.raises(PromptTooLong, match=r"too much media: the prompt.s 0 image\(s\) and 2 clip\(s\)"):
        engine.encode_chat([{"role": "user", "content": long}])
    monkeypatch.setattr("megrez_mlc.omni.audio.MAX_AUDIO_SECONDS", 5)
    with pytest.raises(MediaError, match="limit"):
        ask(audio_part(wav_bytes(tone_clip(6.0, seed=6))))


def test_a_text_model_refuses_audio(built) -> None:
    model = built("q0f32")
    text_engine = Engine(model.model_dir, model.lib, max_batch_size=1)
    with pytest.raises(MegrezError, match="does not hear audio"):
        text_engine.encode_chat([{"role": "user", "content": [audio_part(wav_bytes(tone_clip(1.0, 1)))]}])


def test_a_chat_numbers_its_clips_and_keeps_its_cache(engine: Engine, tmp_path: Path) -> None:
    (tmp_path / "one.wav").write_bytes(wav_bytes(tone_clip(1.5, seed=7)))
    (tmp_path / "two.wav").write_bytes(wav_bytes(tone_clip(1.2, seed=8)))
    settings = {"temperature": 0.0, "repetition_penalty": 1.0, "max_tokens": 6}
    with ChatSession(engine, **settings) as chat:
        chat.ask(content_with_media("", audios=[tmp_path / "one.wav"]))
        chat.ask(content_with_media("Louder?", audios=[tmp_path / "two.wav"]))
        prefill = chat.stats.prefill_tokens
        turn = chat.history[-2].token_ids
    label = engine.tokenizer.encode("Audio 2: ")
    assert any(turn[i : i + len(label)] == label for i in range(len(turn)))  # the conversation's second clip
    # the second turn prefills only itself, the first answer's end and its last token
    assert prefill == len(turn) + len(chat.generation_prompt_ids) + len(chat.answer_end_ids) + 1


# --- the CLI -------------------------------------------------------------------------------------------


def test_generate_with_audio_answers_as_the_engine(engine: Engine, omni_built, tmp_path: Path) -> None:
    model = omni_built("q0f32")
    base = ["generate", str(model.model_dir), "--model-lib", str(model.lib)]
    greedy = ["--temperature", "0", "--repetition-penalty", "1", "--max-tokens", str(MAX_NEW), "--json"]
    out = json.loads(run_cli(*base, "--audio", str(SPEECH), *greedy).stdout)  # a spoken question, no text
    prompt = engine.encode_chat([{"role": "user", "content": [audio_file_part(SPEECH)]}])
    assert out["token_ids"] == engine.generate(prompt, greedy_params(engine)).token_ids
    assert out["usage"]["prompt_tokens"] == len(prompt)
    (tmp_path / "noise.mp3").write_bytes(b"ID3 but no frames at all")
    proc = run_cli(*base, "--audio", str(tmp_path / "noise.mp3"), "--prompt", "hi", check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "could not be decoded" in proc.stderr
    missing = run_cli(*base, "--audio", str(tmp_path / "none.wav"), check=False)
    assert missing.returncode == 1 and "none.wav" in missing.stderr and missing.stderr.count("\n") == 1


def test_chat_audio_command(omni_built, engine: Engine, tmp_path: Path) -> None:
    model = omni_built("q0f32")
    (tmp_path / "q a.wav").write_bytes(wav_bytes(tone_clip(1.8, seed=9)))
    quoted = f'"{tmp_path / "q a.wav"}"'
    lines = [f"/audio {quoted}", f"/audio {tmp_path}/none.wav", f"/audio {quoted} {ASR_PROMPT}", "/stats"]
    proc = chat_with_lines(model, lines)
    out = proc.stdout.splitlines()
    with ChatSession(engine, temperature=0.0, max_tokens=6) as chat:
        first = chat.ask(content_with_media("", audios=[tmp_path / "q a.wav"]))
    assert first and proc.stdout.startswith(first + "\n")  # the answer the session gives
    assert any(line.startswith("error: ") and "none.wav" in line for line in out)
    stats = next(line for line in out if line.startswith("prefill: "))
    turn = engine.encode_message(
        "user", content_with_media(ASR_PROMPT, audios=[tmp_path / "q a.wav"]), clips_before=1
    )
    prefill = int(re.match(r"prefill: (\d+) tok", stats).group(1))
    assert prefill == len(turn) + len(chat.generation_prompt_ids) + len(chat.answer_end_ids) + 1


def test_bench_reports_the_audio(omni_built) -> None:
    model = omni_built("q0f32")
    args = ["bench", str(model.model_dir), "--model-lib", str(model.lib), "--audio", str(SPEECH)]
    result = json.loads(
        run_cli(*args, "--prompt-len", "16", "--gen-len", "4", "--runs", "1", "--json").stdout
    )
    features = clip_features(decode_audio(SPEECH.read_bytes()), 80)
    assert result["audio_tokens"] == features.tokens + 2
    assert result["audio_seconds"] == pytest.approx(features.seconds, abs=0.01)
    assert result["audio_encode_ms_per_second"] > 0 and result["prefill_tok_s"] > 0


# --- the OpenAI server -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(omni_built, tmp_path_factory: pytest.TempPathFactory):
    from .test_serve import serving

    with serving(omni_built("q0f32"), tmp_path_factory.mktemp("omni-audio-serve")) as s:
        yield s


def test_the_openai_client_sends_audio(server, engine: Engine) -> None:
    from .test_serve import MODEL_NAME

    content = [audio_part(SPEECH.read_bytes(), "flac"), {"type": "text", "text": "Answer briefly."}]
    messages = [{"role": "user", "content": content}]
    reply = server.client().chat.completions.create(
        model=MODEL_NAME,
        messages=messages,
        temperature=0,
        max_tokens=MAX_NEW,
        extra_body={"repetition_penalty": 1.0},
    )
    expected = engine.generate(engine.encode_chat(messages), greedy_params(engine))
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == len(engine.encode_chat(messages))


def test_the_transcription_endpoint_answers_with_the_asr_prompt(server, engine: Engine) -> None:
    from .test_serve import MODEL_NAME

    messages = [{"role": "user", "content": [audio_file_part(SPEECH), {"type": "text", "text": ASR_PROMPT}]}]
    prompt = engine.encode_chat(messages)
    params = engine.default_sampling(
        temperature=0.0, repetition_penalty=1.0, max_tokens=engine.max_single_sequence_length
    )
    expected = engine.generate(prompt, engine.chat_sampling(params))
    with SPEECH.open("rb") as file:
        transcript = server.client().audio.transcriptions.create(model=MODEL_NAME, file=file)
    assert transcript.text == expected.text
    assert transcript.usage.input_tokens == len(prompt)
    with SPEECH.open("rb") as file:
        text = server.client().audio.transcriptions.create(
            model=MODEL_NAME, file=file, response_format="text"
        )
    assert text == expected.text


@pytest.mark.parametrize(
    "files,data,status,message",
    [
        (
            {"file": ("a.wav", b"not audio at all", "audio/wav")},
            {"model": "tiny-megrez"},
            400,
            "could not be decoded",
        ),
        (
            {"file": ("a.wav", wav_bytes(np.zeros(8000)), "audio/wav")},
            {"model": "tiny-megrez"},
            400,
            "silent",
        ),
        (None, {"model": "tiny-megrez", "file": "x"}, 400, "`file` field"),
        ({"file": ("a.flac", SPEECH.read_bytes(), "audio/flac")}, {"model": "other"}, 404, "does not exist"),
        (
            {"file": ("a.flac", SPEECH.read_bytes(), "audio/flac")},
            {"model": "tiny-megrez", "response_format": "srt"},
            400,
            "not supported",
        ),
    ],
)
def test_the_transcription_endpoint_refuses_bad_requests(server, files, data, status, message) -> None:
    response = httpx.post(
        f"{server.url}/v1/audio/transcriptions",
        files=files or {"x": ("x", b"", "text/plain")},
        data=data,
        timeout=60,
    )
    assert response.status_code == status
    assert message in response.json()["error"]["message"]


def test_the_server_answers_400_for_a_bad_clip(server) -> None:
    parts = [audio_part(b"nothing to hear here"), {"type": "text", "text": "?"}]
    body = {"model": "tiny-megrez", "messages": [{"role": "user", "content": parts}], "max_tokens": 2}
    response = server.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and "could not be decoded" in response.json()["error"]["message"]
    in_system = [{"role": "system", "content": [audio_part(wav_bytes(tone_clip(1.0, 1)))]}]
    response = server.post("/v1/chat/completions", json={"model": "tiny-megrez", "messages": in_system})
    assert response.status_code == 400 and "only user messages" in response.json()["error"]["message"]
