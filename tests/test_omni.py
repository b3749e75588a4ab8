"""Megrez-3B-Omni's image path: slicing, conversion, image_embed and whole answers against a torch oracle
(transformers' Idefics2VisionTransformer + a resampler written from the public description + LlamaForCausalLM
on inputs_embeds), the chat session, the CLI, the OpenAI server and the GPU targets."""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megrez_mlc.artifacts.tensor_cache import read_index, tensor_records
from megrez_mlc.errors import MegrezError
from megrez_mlc.omni.config import ImageProcessorConfig
from megrez_mlc.omni.images import position_ids, sincos_2d, slice_image
from megrez_mlc.omni.tiny import OMNI_LLM_SHAPE, TinyVision, make_tiny_omni_checkpoint
from megrez_mlc.runtime import Engine
from megrez_mlc.runtime.chat import ChatSession
from megrez_mlc.runtime.engine import PromptTooLong
from megrez_mlc.runtime.media import LOCAL_ACCESS, MediaAccess, MediaError, content_with_media

from .conftest import BuiltModel, run_cli
from .omni_oracle import OmniOracle, sincos_reference

MAX_NEW = 12
QUESTION = "What is in the image?"


def picture(width: int, height: int, seed: int) -> Image.Image:
    """A random-looking but smooth picture (noise on gradients), so resizing matters."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width, 1), y * 255 // max(height, 1), (x * y) % 256], axis=-1)
    return Image.fromarray((base + rng.integers(0, 60, base.shape)).clip(0, 255).astype(np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


# --- slicing, against the MiniCPM-V rule written again here ------------------------------------------------


def reference_slicing(width: int, height: int, scale: int, max_slices: int, patch: int):
    """MiniCPM-V's rule, restated: (grid or None, source size, slice size), sizes as (width, height)."""

    def to_patches(n: float) -> int:
        return max(patch, patch * round(n / patch))

    def fit(w: float, h: float, upscale: bool) -> tuple[int, int]:
        if upscale or w * h > scale**2:
            h_new = int(scale / math.sqrt(w / h))
            w, h = int(h_new * (w / h)), h_new
        return to_patches(w), to_patches(h)

    wanted = min(math.ceil(width * height / scale**2), max_slices)
    if wanted <= 1:
        return None, fit(width, height, True), None
    grids = [
        (c, n // c)
        for n in (wanted - 1, wanted, wanted + 1)
        if 1 < n <= max_slices
        for c in range(1, n + 1)
        if n % c == 0
    ]
    errors = [abs(math.log(width / height) - math.log(c / r)) for c, r in grids]
    cols, rows = grids[errors.index(min(errors))]
    cell = fit(to_patches_of(width, cols) / cols, to_patches_of(height, rows) / rows, True)
    return (cols, rows), fit(width, height, False), cell


def to_patches_of(length: int, parts: int) -> int:
    return max(parts, parts * round(length / parts))


ASPECTS = [(448, 448), (1480, 720), (720, 1480), (1000, 30), (30, 1000), (640, 480), (1920, 1080),
           (300, 301), (2000, 2000), (100, 50), (897, 449), (5000, 1200), (449, 449)]  # fmt: skip


@pytest.mark.parametrize("scale,max_slices", [(448, 9), (112, 9), (252, 4)])
def test_slicing_follows_the_minicpm_v_rule(scale: int, max_slices: int) -> None:
    config = ImageProcessorConfig(scale, max_slices, 14, 64, "a", "b", "a", "b", "u", "\n", {})
    for width, height in ASPECTS:
        grid, source, cell = reference_slicing(width, height, scale, max_slices, 14)
        sliced = slice_image(Image.new("RGB", (width, height)), config)
        assert sliced.source.shape[:2] == (source[1], source[0]), (width, height)
        if grid is None:
            assert sliced.grid is None and not sliced.slices, (width, height)
            continue
        assert (sliced.grid.cols, sliced.grid.rows) == grid, (width, height)
        assert len(sliced.slices) == grid[0] * grid[1]
        assert {s.shape[:2] for s in sliced.slices} == {(cell[1], cell[0])}, (width, height)


def test_the_model_cards_image_takes_seven_slices_and_448_tokens() -> None:
    config = ImageProcessorConfig(448, 9, 14, 64, "a", "b", "a", "b", "u", "\n", {})
    sliced = slice_image(Image.new("RGB", (720, 1480)), config)
    assert (sliced.grid.cols, sliced.grid.rows) == (2, 3)
    assert sliced.source.shape[:2] == (644, 308) and sliced.slices[0].shape[:2] == (518, 378)
    assert len(sliced.all_slices) * 64 == 448


def test_position_ids_are_transformers_buckets() -> None:
    import torch
    from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig
    from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionEmbeddings

    for image_size in (70 * 14, 13 * 14):
        config = Idefics2VisionConfig(hidden_size=1, image_size=image_size, patch_size=14)
        embeddings = Idefics2VisionEmbeddings(config)
        per_side = image_size // 14
        with torch.no_grad():
            embeddings.patch_embedding.weight.zero_()
            embeddings.patch_embedding.bias.zero_()
            embeddings.position_embedding.weight.copy_(
                torch.arange(per_side**2, dtype=torch.float32)[:, None]
            )
        for rows, cols in [(1, 1), (13, 7), (26, 39), (35, 70), (46, 22), (37, 27), (64, 16), (3, 100)]:
            pixels = torch.zeros(1, 3, rows * 14, cols * 14)
            mask = torch.ones(1, rows, cols, dtype=torch.bool)
            with torch.no_grad():
                expected = embeddings(pixels, mask)[0, :, 0].round().int().numpy()
            np.testing.assert_array_equal(
                position_ids(rows, cols, per_side), expected, err_msg=f"{rows}x{cols}"
            )


def test_sincos_positions_match_the_reference() -> None:
    for rows, cols, dim in [(3, 5, 264), (8, 8, 2560), (1, 7, 12)]:
        np.testing.assert_allclose(
            sincos_2d(rows, cols, dim), sincos_reference(rows, cols, dim).numpy(), atol=1e-5
        )


# --- conversion and the compiled model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(omni_built) -> Engine:
    model: BuiltModel = omni_built("q0f32")
    return Engine(model.model_dir, model.lib, max_batch_size=2)


def test_convert_keeps_the_encoder_weights_in_float(
    omni_hf: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from megrez_mlc.quantize.convert import convert_weight
    from megrez_mlc.quantize.gen_config import gen_config

    with caplog.at_level(logging.INFO, logger="megrez_mlc"):
        convert_weight(omni_hf, tmp_path / "q4", "q4f16_1")
    assert not [
        r.getMessage() for r in caplog.records if "skipping" in r.getMessage() or "ignoring" in r.getMessage()
    ]
    records = tensor_records(read_index(tmp_path / "q4"))
    assert records["model.layers.0.self_attn.qkv_proj.q_weight"].dtype == "uint32"  # the LLM: int4
    patch = records["vision.vpm.embeddings.patch_embedding.weight"]
    assert (patch.dtype, patch.shape) == ("float16", (60, 588))
    assert records["vision.resampler.attn.k_proj.weight"].shape == (264, 264)
    conv1 = records["audio.audio.conv1.weight"]  # [out, in, 3] read as a matrix
    assert (conv1.dtype, conv1.shape) == ("float16", (52, 80 * 3))
    assert records["audio.audio.blocks.1.mlp.fc1.weight"].shape == (208, 52)
    assert records["audio.audio.audio_bos_eos_token.weight"].shape == (2, 264)
    assert "audio.audio.blocks.0.attn.key.bias" not in records  # Whisper's keys have no bias
    assert not any(name.startswith("llm.") or ".mlp.0." in name for name in records)
    chat = gen_config(omni_hf, tmp_path / "q4", "q4f16_1")
    saved = json.loads((tmp_path / "q4" / "mlc-chat-config.json").read_text())
    assert saved["model_config"]["vision_config"]["query_num"] == 16
    assert saved["model_config"]["position_embedding_base"] == OMNI_LLM_SHAPE.rope_theta
    processor = saved["image_processor"]
    assert (processor["scale_resolution"], processor["max_slice_nums"]) == (112, 9)
    assert processor["token_ids"]["<|unk|>"] == chat.image_processor.token_ids["<|unk|>"]
    assert saved["model_config"]["audio_config"] == {
        "n_mels": 80, "n_ctx": 1500, "n_state": 52, "n_head": 4, "n_layer": 2, "output_dim": 264
    }  # fmt: skip
    audio = saved["audio_processor"]
    assert (audio["label"], audio["audio_start"], audio["separator"]) == (
        "Audio {index}: ",
        "<|audio_start|>",
        "\n",
    )
    assert audio["token_ids"]["<|audio_end|>"] == chat.audio_processor.token_ids["<|audio_end|>"]


def slice_batch(engine: Engine, image: Image.Image):
    return slice_image(image, engine.chat_config.image_processor).all_slices


# Largest error relative to the largest value, measured on this picture: q0f32 and q4f32_1 2.7e-6 (float32
# vision weights in both), q4f16_1 4.2e-3 (float16 weights and activations).
EMBED_TOLERANCE = {"q0f32": 3e-5, "q4f32_1": 3e-5, "q4f16_1": 2e-2}


@pytest.mark.parametrize("quantization", list(EMBED_TOLERANCE))
def test_image_embeddings_match_the_oracle(omni_built, oracle: OmniOracle, quantization: str) -> None:
    model = omni_built(quantization)
    engine = Engine(model.model_dir, model.lib, max_batch_size=1)
    image = picture(260, 150, seed=3)
    slices = slice_batch(engine, image)
    assert len(slices) == 4  # the source and a 3 x 1 grid
    for pixels in slices:
        got = engine.image_encoder.encode_slice(pixels)
        expected = oracle.encode_slice(pixels)
        assert got.shape == (16, 264)
        error = np.abs(got - expected).max() / np.abs(expected).max()
        assert error < EMBED_TOLERANCE[quantization], (quantization, pixels.shape, error)


def greedy_params(engine: Engine):
    return engine.default_sampling(max_tokens=MAX_NEW, temperature=0.0, repetition_penalty=1.0)


def oracle_answer(
    engine: Engine, oracle: OmniOracle, prompt: list[int], images: list[Image.Image]
) -> list[int]:
    rows = np.concatenate([oracle.encode_slice(p) for image in images for p in slice_batch(engine, image)])
    positions = [i for i, token in enumerate(prompt) if token < 0]
    assert len(positions) == len(rows)
    return oracle.greedy(prompt, dict(zip(positions, rows)), MAX_NEW)


def test_one_image_of_several_slices_answers_as_the_oracle(engine: Engine, oracle: OmniOracle) -> None:
    image = picture(330, 120, seed=4)  # a 3 x 1 grid
    prompt = engine.encode_chat(
        [{"role": "user", "content": [image_part(data_uri(image)), {"type": "text", "text": QUESTION}]}]
    )
    assert sum(t < 0 for t in prompt) == 4 * 16
    answer = engine.generate(prompt, greedy_params(engine))
    assert answer.token_ids == oracle_answer(engine, oracle, prompt, [image])


def test_two_images_answer_as_the_oracle(engine: Engine, oracle: OmniOracle, tmp_path: Path) -> None:
    first, second = picture(250, 250, seed=5), picture(90, 200, seed=6)
    second.save(tmp_path / "second.png")
    content = [
        image_part(data_uri(first)),
        image_part(str(tmp_path / "second.png")),
        {"type": "text", "text": QUESTION},
    ]
    prompt = engine.encode_chat([{"role": "user", "content": content}])
    answer = engine.generate(prompt, greedy_params(engine))
    assert answer.token_ids == oracle_answer(engine, oracle, prompt, [first, second])


def test_the_placeholder_layout(engine: Engine) -> None:
    """The source image, then the grid row by row, each as image_start + query_num fillers + image_end."""
    image = picture(300, 170, seed=7)  # a 3 x 2 grid
    encoded = engine.encode_image(image)
    tok = engine.tokenizer
    start, end = tok.token_to_id("<|image_start|>"), tok.token_to_id("<|image_end|>")
    slice_ids = lambda: [start, *["F"] * 16, end]  # noqa: E731
    newline = tok.encode("\n")
    expected = slice_ids() + slice_ids() * 3 + newline + slice_ids() * 3
    assert ["F" if t < 0 else t for t in encoded.prompt_ids] == expected
    assert encoded.slices == 7
    again = engine.encode_image(picture(300, 170, seed=7))
    assert again.prompt_ids == encoded.prompt_ids and again.seconds == 0.0  # the same pixels, the same ids
    other = engine.encode_image(picture(300, 170, seed=8))
    assert set(other.prompt_ids).isdisjoint(t for t in encoded.prompt_ids if t < 0)


def test_a_chat_keeps_its_cache_across_turns_with_an_image(engine: Engine) -> None:
    image = picture(200, 140, seed=9)
    first = [image_part(data_uri(image)), {"type": "text", "text": QUESTION}]
    settings = {"temperature": 0.0, "repetition_penalty": 1.0, "max_tokens": 8}
    with ChatSession(engine, **settings) as chat:
        chat.ask(first)
        chat.ask("And the colours?")
        second_prefill = chat.stats.prefill_tokens
        ids = chat.history[-1].token_ids
        # the second prompt exactly as the session fed it (the first answer as generated), run from scratch
        prompt = chat.token_ids()[: -len(ids)] + chat.generation_prompt_ids
        answer = ids[len(chat.generation_prompt_ids) : len(ids) - len(chat.answer_end_ids)]
        turn = len(engine.encode_message("user", "And the colours?"))
        # the new turn, the first answer's end and its last token (sampled, never fed back)
        new = turn + len(chat.generation_prompt_ids) + len(chat.answer_end_ids) + 1
    assert second_prefill == new  # the image (4 slices x 16 rows) is not prefilled again
    fresh = engine.generate(prompt, engine.default_sampling(**settings))
    assert answer == fresh.token_ids


def test_bad_images_are_clear_errors(engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def ask(url: str, media: MediaAccess = LOCAL_ACCESS) -> None:
        engine.encode_chat(
            [{"role": "user", "content": [image_part(url), {"type": "text", "text": "?"}]}], media
        )

    with pytest.raises(MediaError, match="is not an image Pillow can read"):
        ask("data:image/png;base64," + base64.b64encode(b"plain text, not a picture").decode())
    truncated = png_bytes(picture(64, 64, seed=1))[:200]
    with pytest.raises(MediaError, match=r"cannot be decoded|not an image"):
        ask("data:image/png;base64," + base64.b64encode(truncated).decode())
    with pytest.raises(MediaError, match="not valid base64"):
        ask("data:image/png;base64,@@@")
    with pytest.raises(MediaError, match="never fetched from the network"):
        ask("https://example.com/cat.png")
    with pytest.raises(MediaError, match="local image files are not allowed"):
        ask(str(tmp_path / "x.png"), MediaAccess(local_files=False))
    picture(20, 20, seed=1).save(tmp_path / "inside.png")
    with pytest.raises(MediaError, match="outside the allowed media folder"):
        ask(str(tmp_path / "inside.png"), MediaAccess(allowed_dir=tmp_path / "sub"))
    monkeypatch.setattr("megrez_mlc.omni.images.MAX_IMAGE_PIXELS", 100 * 100)
    with pytest.raises(MediaError, match=r"is 200x200 pixels"):
        ask(data_uri(picture(200, 200, seed=1)))
    monkeypatch.undo()
    many = [image_part(data_uri(picture(400, 400, seed=s))) for s in range(9)]  # 9 x 10 slices x 18 tokens
    with pytest.raises(PromptTooLong, match=r"too much media: the prompt.s 9 image"):
        engine.encode_chat([{"role": "user", "content": [*many, {"type": "text", "text": "?"}]}])


def test_a_text_model_refuses_images(built) -> None:
    model = built("q0f32")
    text_engine = Engine(model.model_dir, model.lib, max_batch_size=1)
    with pytest.raises(MegrezError, match="does not read images"):
        text_engine.encode_chat([{"role": "user", "content": [image_part(data_uri(picture(30, 30, 1)))]}])


# --- the CLI -------------------------------------------------------------------------------------------


def test_generate_with_an_image_answers_as_the_engine(engine: Engine, omni_built, tmp_path: Path) -> None:
    model = omni_built("q0f32")
    image = picture(240, 130, seed=10)
    image.save(tmp_path / "photo.png")
    args = [
        "generate",
        str(model.model_dir),
        "--model-lib",
        str(model.lib),
        "--image",
        str(tmp_path / "photo.png"),
    ]
    args += [
        "--prompt",
        QUESTION,
        "--temperature",
        "0",
        "--repetition-penalty",
        "1",
        "--max-tokens",
        str(MAX_NEW),
    ]
    out = json.loads(run_cli(*args, "--json").stdout)
    prompt = engine.encode_chat(
        [{"role": "user", "content": [image_part(data_uri(image)), {"type": "text", "text": QUESTION}]}]
    )
    assert out["token_ids"] == engine.generate(prompt, greedy_params(engine)).token_ids
    assert out["usage"]["prompt_tokens"] == len(prompt)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    proc = run_cli(*args[:-8], "--image", str(broken), "--prompt", "hi", check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("error: image ") and proc.stderr.count("\n") == 1


def chat_with_lines(model: BuiltModel, lines: list[str]):
    """`megrez-mlc chat` (greedy, 6 tokens an answer) with `lines` piped in; its finished process."""
    import subprocess
    import sys

    command = [
        sys.executable,
        "-m",
        "megrez_mlc",
        "chat",
        str(model.model_dir),
        "--model-lib",
        str(model.lib),
    ]
    command += ["--temperature", "0", "--max-tokens", "6"]
    return subprocess.run(command, input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120)


def test_chat_image_command(omni_built, engine: Engine, tmp_path: Path) -> None:
    model = omni_built("q0f32")
    picture(150, 150, seed=11).save(tmp_path / "a b.png")
    quoted = f'"{tmp_path / "a b.png"}"'
    lines = [
        f"/image {quoted}",
        "What is it?",
        f"/image {tmp_path}/none.png",
        f"/image {quoted} Again?",
        "/stats",
    ]
    proc = chat_with_lines(model, lines)
    out = proc.stdout.splitlines()
    assert out[0] == f"image {tmp_path / 'a b.png'} attached; now type your message"
    assert any(line.startswith("error: cannot read image") for line in out)
    stats = next(line for line in out if line.startswith("prefill: "))
    prefill = int(re.match(r"prefill: (\d+) tok", stats).group(1))
    # the second turn prefills only itself (its image, encoded once, at new positions), not the first turn
    session = ChatSession(engine)
    turn = engine.encode_message("user", content_with_media("Again?", [tmp_path / "a b.png"]))
    assert prefill == len(turn) + len(session.generation_prompt_ids) + len(session.answer_end_ids) + 1


def test_bench_reports_the_image(omni_built, tmp_path: Path) -> None:
    model = omni_built("q0f32")
    picture(300, 170, seed=12).save(tmp_path / "p.png")
    args = ["bench", str(model.model_dir), "--model-lib", str(model.lib), "--image", str(tmp_path / "p.png")]
    proc = run_cli(*args, "--prompt-len", "16", "--gen-len", "4", "--runs", "1", "--json")
    result = json.loads(proc.stdout)
    assert (result["image_slices"], result["image_tokens"]) == (7, 7 * 18 + 1)
    assert result["image_encode_ms_per_slice"] > 0 and result["prefill_tok_s"] > 0


def test_demo_omni(tmp_path: Path) -> None:
    proc = run_cli("demo", "--omni", "--workdir", str(tmp_path))
    steps = re.findall(r"^\[\s*[\d.]+ s\] (\S+)", proc.stdout, flags=re.M)
    expected = [
        "checkpoint:",
        "convert-weight",
        "gen-config",
        "compile",
        "load",
        "encode",
        "encode",
        "generate",
    ]
    assert steps == expected
    assert "image: 300x170, 7 slices, 127 tokens" in proc.stdout
    assert "clip: 2.5 s, 66 tokens" in proc.stdout  # 250 mel frames -> 125 encoder frames -> 62 + 2 + 2
    token_ids = json.loads(re.search(r"^token ids: (\[.*\])$", proc.stdout, flags=re.M).group(1))
    model_dir = tmp_path / "tiny-megrez-omni-q4f32_1"
    args = ["generate", str(model_dir), "--model-lib", str(model_dir / "tiny-megrez-omni-q4f32_1-cpu.so")]
    args += ["--image", str(tmp_path / "demo-image.png"), "--audio", str(tmp_path / "demo-clip.wav")]
    args += ["--prompt", "图片里有什么？"]
    again = run_cli(*args, "--temperature", "0", "--max-tokens", "24", "--json")
    assert json.loads(again.stdout)["token_ids"] == token_ids


# --- GPU targets -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def omni_gpu_model(tmp_path_factory: pytest.TempPathFactory):
    """Omni with head_dim 64 (TVM's GPU attention kernels do not tile 66)."""
    import dataclasses

    from megrez_mlc.quantize.convert import convert_weight
    from megrez_mlc.quantize.gen_config import gen_config

    root = tmp_path_factory.mktemp("omni-gpu")
    hf = make_tiny_omni_checkpoint(
        root / "hf", shape=dataclasses.replace(OMNI_LLM_SHAPE, hidden_size=256, head_dim=64), seed=3,
        vision=TinyVision(num_attention_heads=5, hidden_size=80),
    )  # fmt: skip
    models = {}
    for quantization in ("q4f16_1", "q4f32_1"):
        convert_weight(hf, root / quantization, quantization)
        gen_config(hf, root / quantization, quantization)
        models[quantization] = root / quantization
    return models


# Each GPU code generator once: android is opencl's, iphone metal's, and vulkan (run below) webgpu's.
@pytest.mark.parametrize("target", ["cuda", "opencl", "metal"])
def test_the_encoders_compile_with_every_operator_on_device(
    omni_gpu_model, target: str, tmp_path: Path
) -> None:
    from megrez_mlc.compile.compiler import compile_model

    suffix = ".tar" if target == "metal" else ".so"
    result = compile_model(omni_gpu_model["q4f16_1"], target, tmp_path / f"lib{suffix}")
    assert {"image_embed", "audio_embed"} <= set(result.metadata["memory_usage"])
    for kernel in ("gelu_tanh", "gelu_erf", "conv_windows", "average_pairs"):
        assert any(kernel in name for name in result.device_functions), kernel
    assert any("softmax" in name for name in result.device_functions)


def test_the_encoders_on_vulkan_match_the_cpu(omni_gpu_model, tmp_path: Path) -> None:
    from megrez_mlc.compile.compiler import compile_model
    from megrez_mlc.runtime.model_lib import ModelLibrary

    model_dir = omni_gpu_model["q4f32_1"]
    compile_model(model_dir, "cpu", tmp_path / "cpu.so")
    compile_model(model_dir, "vulkan", tmp_path / "vulkan.so")
    cpu = Engine(model_dir, tmp_path / "cpu.so", max_batch_size=1)
    gpu = ModelLibrary(model_dir, tmp_path / "vulkan.so", "vulkan", max_batch_size=1)
    for pixels in slice_batch(cpu, picture(260, 150, seed=13))[:2]:
        from megrez_mlc.omni.images import slice_inputs

        inputs = slice_inputs(pixels, cpu.chat_config.model_config.vision, 256)
        expected = cpu.model.image_embed(inputs)
        np.testing.assert_allclose(gpu.image_embed(inputs), expected, atol=1e-4 * np.abs(expected).max())
    mel = np.random.default_rng(14).uniform(-1.5, 1.5, (202, 80)).astype(np.float32)  # 2 s of frames
    expected = cpu.model.audio_embed(mel)
    assert expected.shape == (202 // 4 + 2, 256)
    np.testing.assert_allclose(gpu.audio_embed(mel), expected, atol=1e-4 * np.abs(expected).max())


# --- the OpenAI server -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("media")
    picture(180, 120, seed=20).save(folder / "allowed.png")
    return folder


@pytest.fixture(scope="module")
def server(omni_built, media_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from .test_serve import serving

    with serving(
        omni_built("q0f32"), tmp_path_factory.mktemp("omni-serve"), "--allowed-media-dir", str(media_dir)
    ) as s:
        yield s


def test_the_openai_client_sends_an_image(server, engine: Engine, media_dir: Path) -> None:
    from .test_serve import MODEL_NAME

    image = picture(220, 160, seed=21)
    content = [image_part(data_uri(image)), {"type": "text", "text": QUESTION}]
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
    # the next turn, the image still in the history, reuses the cached prefix
    follow = [
        *messages,
        {"role": "assistant", "content": expected.text},
        {"role": "user", "content": "More?"},
    ]
    again = server.client().chat.completions.create(
        model=MODEL_NAME, messages=follow, temperature=0, max_tokens=4
    )
    assert again.usage.prompt_tokens == len(engine.encode_chat(follow))
    assert server.health()["prefix_cache"]["hits"] >= 1
    local = [image_part(str(media_dir / "allowed.png")), {"type": "text", "text": "?"}]
    inside = server.client().chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": local}], max_tokens=2
    )
    assert inside.usage.prompt_tokens == len(engine.encode_chat([{"role": "user", "content": local}]))


@pytest.mark.parametrize(
    "url,message",
    [
        ("data:image/png;base64," + base64.b64encode(b"not an image at all").decode(), "is not an image"),
        ("data:text/plain;base64,aGVsbG8=", "holds text/plain, not an image"),
        ("https://example.com/cat.png", "never fetched from the network"),
        ("/etc/hostname", "outside the allowed media folder"),
    ],
)
def test_the_server_answers_400_for_a_bad_image(server, url: str, message: str) -> None:
    response = server.post(
        "/v1/chat/completions",
        json={
            "model": "tiny-megrez",
            "messages": [{"role": "user", "content": [image_part(url)]}],
            "max_tokens": 2,
        },
    )
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]


def test_the_server_answers_400_for_too_many_images(server) -> None:
    parts = [image_part(data_uri(picture(400, 400, seed=s))) for s in range(9)]
    body = {"model": "tiny-megrez", "messages": [{"role": "user", "content": parts}], "max_tokens": 2}
    response = server.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert "too much media" in response.json()["error"]["message"]
    images_in_system = [{"role": "system", "content": [image_part(data_uri(picture(30, 30, 1)))]}]
    response = server.post(
        "/v1/chat/completions", json={"model": "tiny-megrez", "messages": images_in_system}
    )
    assert response.status_code == 400 and "only user messages" in response.json()["error"]["message"]
