"""`bench`: prefill and decode speed of a compiled model, as llama.cpp's llama-bench measures them.

Each run prefills `batch` random prompts of `prompt_len` tokens, then decodes `gen_len` tokens for all of
them together (greedy), timing the two phases apart. A first run warms caches and is not counted; the
median of the counted runs is reported.

With an image (Omni models), each run also encodes the image's slices one by one (image_embed, timed per
slice), and with an audio file its 30-second chunks (audio_embed, timed per second of audio); every prompt
starts with the image's and the clip's placeholders: the prefill includes their tokens.
"""

from __future__ import annotations

import resource
import statistics
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..artifacts.chat_config import read_chat_config
from ..errors import MegrezError
from ..omni.audio import clip_features, read_audio_file, split_clip
from ..omni.config import WHISPER_CONTEXT
from ..omni.images import read_image_file, slice_image
from .engine import Engine


@dataclass(frozen=True)
class BenchResult:
    prefill_tok_s: float
    decode_tok_s: float
    ttft_ms: float  # time to first token: the prefill plus choosing the first token
    peak_rss_mb: float
    prompt_len: int
    gen_len: int
    batch: int
    threads: int
    runs: int
    image_slices: int = 0
    image_tokens: int = 0  # of each prompt, beside prompt_len text tokens
    image_encode_ms_per_slice: float = 0.0
    audio_seconds: float = 0.0
    audio_tokens: int = 0  # of each prompt
    audio_encode_ms_per_second: float = 0.0  # of audio

    def to_json(self) -> dict:
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class _Run:
    prefill_s: float
    first_token_s: float
    decode_s: float


def _one_run(engine: Engine, prompts: list[list[int]], gen_len: int) -> _Run:
    with ExitStack() as stack:
        sequences = [stack.enter_context(engine.new_sequence()) for _ in prompts]
        start = time.perf_counter()
        logits = engine.prefill(sequences, prompts)
        prefilled = time.perf_counter()
        tokens = np.argmax(logits, axis=-1).tolist()
        first_token = time.perf_counter()
        for _ in range(gen_len - 1):
            tokens = np.argmax(engine.decode(sequences, tokens), axis=-1).tolist()
        done = time.perf_counter()
    return _Run(prefilled - start, first_token - start, done - first_token)


def run_bench(
    model_dir: Path,
    model_lib: Path,
    *,
    device: str = "cpu",
    prompt_len: int = 128,
    gen_len: int = 128,
    batch: int = 1,
    threads: int | None = None,
    runs: int = 3,
    seed: int = 0,
    image: Path | None = None,
    audio: Path | None = None,
) -> BenchResult:
    if min(prompt_len, gen_len, batch, runs) < 1:
        raise MegrezError("--prompt-len, --gen-len, --batch and --runs must be at least 1")
    image_room = 0  # KV-cache room for each prompt's image tokens: at most every slice, a newline per row
    if image is not None:
        processor = read_chat_config(model_dir)[1].image_processor
        if processor is None:
            raise MegrezError(f"{model_dir} is not a Megrez-3B-Omni model, so --image does not apply")
        image_room = (processor.max_slice_nums + 1) * (processor.query_num + 2 + 4)
    samples, audio_room = None, 0
    if audio is not None:
        if read_chat_config(model_dir)[1].audio_processor is None:
            raise MegrezError(f"{model_dir} is not a Megrez-3B-Omni model, so --audio does not apply")
        samples = read_audio_file(audio)
        audio_room = len(split_clip(samples)) * (WHISPER_CONTEXT // 2 + 4)
    engine = Engine(
        model_dir,
        model_lib,
        device,
        max_batch_size=batch,
        max_total_seq_len=batch * (prompt_len + gen_len + image_room + audio_room),
        threads=threads,
    )
    placeholder, encode_s = [], 0.0
    if image is not None:
        pixels = read_image_file(image)
        placeholder = engine.encode_image(pixels).prompt_ids  # also the warm-up of image_embed
        slices = slice_image(pixels, engine.image_encoder.processor).all_slices
        timings = [_encode_slices(engine, slices) for _ in range(runs)]
        encode_s = statistics.median(timings)
    clip, audio_s = None, 0.0
    if samples is not None:
        clip = engine.encode_audio(samples)  # also the warm-up of audio_embed
        placeholder = placeholder + clip.prompt_ids
        audio_s = statistics.median(_encode_clip(engine, samples) for _ in range(runs))
    total = len(placeholder) + prompt_len + gen_len
    if total > engine.context_window_size:
        raise MegrezError(
            f"--prompt-len + --gen-len (+ the media's {len(placeholder)} tokens) = {total} exceeds the "
            f"library's context window ({engine.context_window_size}); compile with a larger "
            "--context-window-size"
        )
    rng = np.random.default_rng(seed)
    prompts = [placeholder + rng.integers(0, engine.vocab_size, prompt_len).tolist() for _ in range(batch)]
    _one_run(engine, prompts, min(gen_len, 4))  # warm-up: page in weights, start the thread pool
    measured = [_one_run(engine, prompts, gen_len) for _ in range(runs)]
    prefill_s = statistics.median(r.prefill_s for r in measured)
    first_token_s = statistics.median(r.first_token_s for r in measured)
    decode_s = statistics.median(r.decode_s for r in measured)
    decoded = batch * (gen_len - 1)  # the first token of each sequence comes from the prefill
    return BenchResult(
        prefill_tok_s=batch * len(prompts[0]) / prefill_s,
        decode_tok_s=decoded / decode_s if decoded else 0.0,
        ttft_ms=first_token_s * 1e3,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        prompt_len=prompt_len,
        gen_len=gen_len,
        batch=batch,
        threads=engine.threads,
        runs=runs,
        image_slices=len(slices) if image is not None else 0,
        image_tokens=len(placeholder) - (len(clip.prompt_ids) if clip else 0),
        image_encode_ms_per_slice=encode_s / len(slices) * 1e3 if image is not None else 0.0,
        audio_seconds=clip.duration if clip else 0.0,
        audio_tokens=len(clip.prompt_ids) if clip else 0,
        audio_encode_ms_per_second=audio_s / clip.duration * 1e3 if clip else 0.0,
    )


def _encode_slices(engine: Engine, slices: tuple[np.ndarray, ...]) -> float:
    """Seconds to run every slice through image_embed (the media cache bypassed)."""
    start = time.perf_counter()
    for pixels in slices:
        engine.image_encoder.encode_slice(pixels)
    return time.perf_counter() - start


def _encode_clip(engine: Engine, samples: np.ndarray) -> float:
    """Seconds to run every chunk of a clip through audio_embed (the media cache bypassed)."""
    n_mels = engine.audio_encoder.processor.n_mels
    features = [clip_features(chunk, n_mels) for chunk in split_clip(samples)]
    start = time.perf_counter()
    for f in features:
        engine.model.audio_embed(f.mel)
    return time.perf_counter() - start
