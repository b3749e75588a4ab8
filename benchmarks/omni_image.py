"""Megrez-3B-Omni's image path at full size on this CPU: image encode per slice, prefill with the image.

    python benchmarks/omni_image.py [--quantization q4f32_1] [--threads 2] [--runs 3] [--cache-dir DIR]

Builds and caches (under $MEGREZ_MLC_HOME/bench, or --cache-dir) a random bf16 checkpoint of Omni's
shape: the random Megrez-3B of fullsize.py under `llm.` (its shards copied with renamed headers), a
SigLIP-SO400M tower (27 layers of 1152, 16 heads, 70x70 positions) and a resampler of 64 queries of 2560
under the vendor's names; converts and compiles it for this CPU. Then it runs `bench --image` on a
synthetic 1480x720 image (MiniCPM-V slicing: the source + a 3x2 grid, 7 slices, 448 image tokens) with a
128-token prompt and 128 generated tokens, and prints the numbers beside the model card's vLLM/H100 ones.
In the same run (unless --no-torch), transformers' Idefics2VisionTransformer, float32 with the same tower
weights and threads, encodes the same slices: the peer a user of the vendor's code has on a CPU (the tower
only; the resampler, ~3% of the work, is left out of its time).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from fullsize import _to_bf16, ensure_checkpoint  # noqa: E402

from megrez_mlc.home import megrez_home  # noqa: E402
from megrez_mlc.omni.config import OMNI_ARCHITECTURE, OMNI_MODEL_TYPE, SIGLIP_SO400M  # noqa: E402

CHECKPOINT_NAME = "megrez-3b-omni-random-bf16"
IMAGE_SIZE = (1480, 720)  # width x height, the model card's image turned on its side
# The model card's inference-speed table: vLLM on one H100, 128 text tokens + a 720x1480 image in, 128 out,
# 8 sequences at once.
MODEL_CARD = {"image tokens": 448, "prefill tok/s": 6312.66, "decode tok/s": 1294.9}


def _read_header(path: Path) -> tuple[dict, int]:
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length)), 8 + length


def _write_with_header(path: Path, header: dict, source: Path | None, data_start: int) -> None:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        if source is not None:
            with source.open("rb") as f:
                f.seek(data_start)
                shutil.copyfileobj(f, out, 64 * 2**20)


def vision_shapes(hidden: int) -> dict[str, tuple[int, ...]]:
    v = SIGLIP_SO400M
    h, i, p = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "vision.vpm.embeddings.patch_embedding.weight": (h, 3, p, p),
        "vision.vpm.embeddings.patch_embedding.bias": (h,),
        "vision.vpm.embeddings.position_embedding.weight": ((v["image_size"] // p) ** 2, h),
    }
    for n in range(v["num_hidden_layers"]):
        layer = f"vision.vpm.encoder.layers.{n}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes |= {f"{layer}.self_attn.{proj}.weight": (h, h), f"{layer}.self_attn.{proj}.bias": (h,)}
        for norm in ("layer_norm1", "layer_norm2"):
            shapes |= {f"{layer}.{norm}.weight": (h,), f"{layer}.{norm}.bias": (h,)}
        shapes |= {
            f"{layer}.mlp.fc1.weight": (i, h),
            f"{layer}.mlp.fc1.bias": (i,),
            f"{layer}.mlp.fc2.weight": (h, i),
            f"{layer}.mlp.fc2.bias": (h,),
        }
    shapes |= {"vision.vpm.post_layernorm.weight": (h,), "vision.vpm.post_layernorm.bias": (h,)}
    r = "vision.resampler"
    shapes |= {
        f"{r}.query": (64, hidden),
        f"{r}.kv_proj.weight": (hidden, h),
        f"{r}.attn.in_proj_weight": (3 * hidden, hidden),
        f"{r}.attn.in_proj_bias": (3 * hidden,),
        f"{r}.attn.out_proj.weight": (hidden, hidden),
        f"{r}.attn.out_proj.bias": (hidden,),
        f"{r}.proj": (hidden, hidden),
    }
    for norm in ("ln_q", "ln_kv", "ln_post"):
        shapes |= {f"{r}.{norm}.weight": (hidden,), f"{r}.{norm}.bias": (hidden,)}
    return shapes


def _random_bf16(shape: tuple[int, ...], rng: np.random.Generator) -> bytes:
    if len(shape) == 1:
        return _to_bf16(0.05 * rng.standard_normal(shape, dtype=np.float32)).tobytes()
    cols = int(np.prod(shape[1:]))
    values = rng.standard_normal(shape, dtype=np.float32) * np.float32(1 / np.sqrt(cols))
    return _to_bf16(values).tobytes()


def make_omni_checkpoint(llm_dir: Path, out: Path) -> None:
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    config = json.loads((llm_dir / "config.json").read_text())
    config |= {
        "architectures": [OMNI_ARCHITECTURE],
        "model_type": OMNI_MODEL_TYPE,
        "vision_config": {"model_type": "siglip_vision_model", **SIGLIP_SO400M},
        "query_num": 64,
        "patch_size": 14,
        "max_position_embeddings": 4096,
    }
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copyfile(llm_dir / "tokenizer.json", partial / "tokenizer.json")
    weight_map = {}
    index = json.loads((llm_dir / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        header, start = _read_header(llm_dir / shard)
        renamed = {("llm." + k if k != "__metadata__" else k): v for k, v in header.items()}
        print(f"copying {shard} with the LLM's tensors renamed llm.*")
        _write_with_header(partial / shard, renamed, llm_dir / shard, start)
        weight_map |= {k: shard for k in renamed if k != "__metadata__"}
    shapes = vision_shapes(config["hidden_size"])
    rng = np.random.default_rng(1)
    blobs = {name: _random_bf16(shape, rng) for name, shape in shapes.items()}
    header, offset = {}, 0
    for name, shape in shapes.items():
        header[name] = {
            "dtype": "BF16",
            "shape": list(shape),
            "data_offsets": [offset, offset + len(blobs[name])],
        }
        offset += len(blobs[name])
    vision_file = "model-vision.safetensors"
    print(f"writing {vision_file} ({offset / 1e9:.2f} GB)")
    _write_with_header(partial / vision_file, header, None, 0)
    with (partial / vision_file).open("ab") as f:
        for blob in blobs.values():
            f.write(blob)
    weight_map |= dict.fromkeys(shapes, vision_file)
    (partial / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    partial.rename(out)


def synthetic_image(path: Path) -> Path:
    from PIL import Image

    width, height = IMAGE_SIZE
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(0)
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1)
    pixels = (pixels + rng.integers(0, 32, pixels.shape)).clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def torch_tower_ms_per_slice(hf_dir: Path, image: Path, threads: int, runs: int) -> float:
    """transformers' tower on the checkpoint's vision weights: median ms per slice over the image's slices."""
    import statistics
    import time

    import torch
    from PIL import Image
    from safetensors.torch import load_file
    from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig
    from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer

    from megrez_mlc.omni.config import ImageProcessorConfig
    from megrez_mlc.omni.images import slice_image

    torch.set_num_threads(threads)
    fields = {k: v for k, v in SIGLIP_SO400M.items() if k != "hidden_act"}
    tower = Idefics2VisionTransformer(Idefics2VisionConfig(**fields)).eval()
    weights = load_file(str(hf_dir / "model-vision.safetensors"))
    prefix = "vision.vpm."
    tower.load_state_dict({k[len(prefix) :]: v.float() for k, v in weights.items() if k.startswith(prefix)})
    processor = ImageProcessorConfig(448, 9, 14, 64, "", "", "", "", "", "\n", {})
    slices = slice_image(Image.open(image).convert("RGB"), processor).all_slices
    inputs = [(torch.from_numpy(p.astype(np.float32)).permute(2, 0, 1)[None] - 127.5) / 127.5 for p in slices]
    timings = []
    with torch.no_grad():
        tower(pixel_values=inputs[0])  # warm-up
        for _ in range(runs):
            start = time.perf_counter()
            for x in inputs:
                tower(pixel_values=x)
            timings.append((time.perf_counter() - start) / len(inputs))
    return statistics.median(timings) * 1e3


def machine() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {len(__import__('os').sched_getaffinity(0))} cores"
    except OSError:
        pass
    return platform.processor()


def built_for_cpu(hf_dir: Path, model_dir: Path, quantization: str) -> Path:
    """The checkpoint converted into model_dir and compiled for this CPU (each step once, then cached)."""
    from megrez_mlc.compile.compiler import compile_model
    from megrez_mlc.quantize.convert import convert_weight
    from megrez_mlc.quantize.gen_config import gen_config

    if not (model_dir / "mlc-chat-config.json").is_file():
        convert_weight(hf_dir, model_dir, quantization)
        gen_config(hf_dir, model_dir, quantization)
    lib = model_dir / "cpu.so"
    if not lib.is_file():
        compile_model(model_dir, "cpu", lib)
    return lib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantization", default="q4f32_1")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--no-torch", action="store_true", help="Leave out the transformers peer.")
    args = parser.parse_args()

    from megrez_mlc.runtime.bench import run_bench

    cache = args.cache_dir or megrez_home() / "bench"
    hf_dir = cache / CHECKPOINT_NAME
    if not (hf_dir / "config.json").is_file():
        make_omni_checkpoint(ensure_checkpoint(cache), hf_dir)
    model_dir = cache / f"megrez-3b-omni-{args.quantization}"
    lib = built_for_cpu(hf_dir, model_dir, args.quantization)
    image = synthetic_image(cache / "omni-1480x720.png")
    result = run_bench(
        model_dir, lib, prompt_len=128, gen_len=128, threads=args.threads, runs=args.runs, image=image
    )
    print(
        f"\nMegrez-3B-Omni shape, random weights, {args.quantization}; {machine()}, {result.threads} threads"
    )
    width, height = IMAGE_SIZE
    print(f"image {width}x{height}: {result.image_slices} slices, {result.image_tokens} image tokens")
    peer = "-"
    if not args.no_torch:
        peer = f"{torch_tower_ms_per_slice(hf_dir, image, result.threads, args.runs):.0f} (tower)"
    encode_s = result.image_encode_ms_per_slice * result.image_slices / 1e3
    print(f"{'':34}{'megrez-mlc':>12}{'transformers f32':>18}{'model card: vLLM, H100, 8 seq':>32}")
    rows = [
        ("image encode, ms per slice", f"{result.image_encode_ms_per_slice:.0f}", peer, "-"),
        ("image encode, s per image", f"{encode_s:.1f}", "", "-"),
        ("image tokens", f"{result.image_tokens}", "", f"{MODEL_CARD['image tokens']}"),
        (
            "prefill (image + 128 text) tok/s",
            f"{result.prefill_tok_s:.1f}",
            "",
            f"{MODEL_CARD['prefill tok/s']}",
        ),
        ("decode tok/s", f"{result.decode_tok_s:.1f}", "", f"{MODEL_CARD['decode tok/s']}"),
        ("peak RSS, MB", f"{result.peak_rss_mb:.0f}", "", "-"),
    ]
    for label, ours, torch_value, card in rows:
        print(f"{label:<34}{ours:>12}{torch_value:>18}{card:>32}")


if __name__ == "__main__":
    main()
