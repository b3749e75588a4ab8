"""`megrez-mlc demo`: the whole pipeline on a tiny random Megrez-shaped model, each step timed."""

from __future__ import annotations

import shutil
import time
import wave
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .compile.compiler import compile_model
from .home import megrez_home
from .omni.audio import SAMPLE_RATE, read_audio_file
from .omni.images import read_image_file
from .omni.tiny import make_tiny_omni_checkpoint
from .quantize.convert import convert_weight
from .quantize.gen_config import gen_config
from .runtime import Engine
from .runtime.engine import Content
from .runtime.media import content_with_media
from .tiny import make_tiny_checkpoint

T = TypeVar("T")
DEMO_IMAGE_SIZE = (300, 170)  # width x height: a source and a 3 x 1 grid of slices at the tiny model's scale
DEMO_CLIP_SECONDS = 2.5


def synthetic_image(path: Path) -> Path:
    """A deterministic picture (colour gradients and a disc) for the Omni demo."""
    import numpy as np
    from PIL import Image

    width, height = DEMO_IMAGE_SIZE
    y, x = np.mgrid[0:height, 0:width]
    disc = (x - width / 3) ** 2 + (y - height / 2) ** 2 < (height / 3) ** 2
    pixels = np.stack([x * 255 // width, y * 255 // height, np.where(disc, 230, 40)], axis=-1)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def synthetic_clip(path: Path) -> Path:
    """A deterministic 16 kHz 16-bit WAV for the Omni demo: a rising tone with a few harmonics, warbling
    like a voice."""
    import numpy as np

    t = np.arange(int(DEMO_CLIP_SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
    phase = 2 * np.pi * (180 * t + 40 * t**2 + 3 * np.sin(2 * np.pi * 5 * t))
    voice = sum(np.sin(k * phase) / k for k in range(1, 6)) * np.hanning(t.size)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes((0.3 * voice * 32767).astype("<i2").tobytes())
    return path


def run_demo(
    workdir: Path | None,
    quantization: str,
    prompt: str,
    echo: Callable[[str], None] = print,
    omni: bool = False,
) -> str:
    """Build, convert, compile and generate; returns the generated text. `omni`: a tiny random
    Megrez-3B-Omni, a synthetic image and a synthetic clip, through the image and audio paths."""
    workdir = workdir or megrez_home() / "demo"
    name = "tiny-megrez-omni" if omni else "tiny-megrez"
    hf_dir, model_dir = workdir / f"{name}-hf", workdir / f"{name}-{quantization}"
    lib = model_dir / f"{name}-{quantization}-cpu.so"
    shutil.rmtree(hf_dir, ignore_errors=True)
    shutil.rmtree(model_dir, ignore_errors=True)

    def step(title: str, action: Callable[[], T]) -> T:
        start = time.perf_counter()
        result = action()
        echo(f"[{time.perf_counter() - start:6.2f} s] {title}")
        return result

    if omni:
        step(
            f"checkpoint: tiny random Megrez-3B-Omni-shaped model -> {hf_dir}",
            lambda: make_tiny_omni_checkpoint(hf_dir),
        )
    else:
        step(f"checkpoint: tiny random Megrez-shaped model -> {hf_dir}", lambda: make_tiny_checkpoint(hf_dir))
    step(
        f"convert-weight --quantization {quantization} -> {model_dir}",
        lambda: convert_weight(hf_dir, model_dir, quantization),
    )
    step("gen-config --conv-template megrez", lambda: gen_config(hf_dir, model_dir, quantization))
    step(f"compile --target cpu -> {lib.name}", lambda: compile_model(model_dir, "cpu", lib))
    engine = step("load engine", lambda: Engine(model_dir, lib))
    params = engine.default_sampling(max_tokens=24, temperature=0.0)
    content: Content = prompt
    image_option = ""
    if omni:
        image = synthetic_image(workdir / "demo-image.png")
        encoded = step(
            f"encode {image.name} (slice, image_embed)", lambda: engine.encode_image(read_image_file(image))
        )
        width, height = DEMO_IMAGE_SIZE
        echo(f"image: {width}x{height}, {encoded.slices} slices, {len(encoded.prompt_ids)} tokens")
        clip = synthetic_clip(workdir / "demo-clip.wav")
        heard = step(
            f"encode {clip.name} (log-mel, audio_embed)", lambda: engine.encode_audio(read_audio_file(clip))
        )
        echo(f"clip: {heard.duration:.1f} s, {len(heard.prompt_ids)} tokens")
        content = content_with_media(prompt, [image], [clip])
        image_option = f" --image {image} --audio {clip}"
    prompt_ids = engine.encode_chat([{"role": "user", "content": content}])
    result = step("generate (greedy, 24 tokens)", lambda: engine.generate(prompt_ids, params))
    echo(f"prompt: {prompt}")
    echo(f"output ({len(result.token_ids)} tokens, random weights, so gibberish): {result.text!r}")
    echo(f"token ids: {result.token_ids}")
    echo(f"try it: megrez-mlc generate {model_dir} --model-lib {lib}{image_option} --prompt '{prompt}'")
    if omni:
        echo(f"   or: megrez-mlc chat {model_dir} --model-lib {lib}   (then /image {image} What is this?)")
        echo(f"       (or /audio {clip} 将语音转化为文字。)")
    return result.text
