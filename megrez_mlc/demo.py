"""`megrez-mlc demo`: the whole pipeline on a tiny random Megrez-shaped model, each step timed."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .compile.compiler import compile_model
from .home import megrez_home
from .quantize.convert import convert_weight
from .quantize.gen_config import gen_config
from .runtime import Engine
from .tiny import make_tiny_checkpoint

T = TypeVar("T")


def run_demo(
    workdir: Path | None, quantization: str, prompt: str, echo: Callable[[str], None] = print
) -> str:
    """Build, convert, compile and generate; returns the generated text."""
    workdir = workdir or megrez_home() / "demo"
    hf_dir, model_dir = workdir / "tiny-megrez-hf", workdir / f"tiny-megrez-{quantization}"
    lib = model_dir / f"tiny-megrez-{quantization}-cpu.so"
    shutil.rmtree(hf_dir, ignore_errors=True)
    shutil.rmtree(model_dir, ignore_errors=True)

    def step(title: str, action: Callable[[], T]) -> T:
        start = time.perf_counter()
        result = action()
        echo(f"[{time.perf_counter() - start:6.2f} s] {title}")
        return result

    step(f"checkpoint: tiny random Megrez-shaped model -> {hf_dir}", lambda: make_tiny_checkpoint(hf_dir))
    step(
        f"convert-weight --quantization {quantization} -> {model_dir}",
        lambda: convert_weight(hf_dir, model_dir, quantization),
    )
    step("gen-config --conv-template megrez", lambda: gen_config(hf_dir, model_dir, quantization))
    step(f"compile --target cpu -> {lib.name}", lambda: compile_model(model_dir, "cpu", lib))
    engine = step("load engine", lambda: Engine(model_dir, lib))
    params = engine.default_sampling(max_tokens=24, temperature=0.0)
    prompt_ids = engine.encode_chat([{"role": "user", "content": prompt}])
    result = step("generate (greedy, 24 tokens)", lambda: engine.generate(prompt_ids, params))
    echo(f"prompt: {prompt}")
    echo(f"output ({len(result.token_ids)} tokens, random weights, so gibberish): {result.text!r}")
    echo(f"token ids: {result.token_ids}")
    echo(f"try it: megrez-mlc generate {model_dir} --model-lib {lib} --prompt '{prompt}'")
    return result.text
