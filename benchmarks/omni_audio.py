"""Megrez-3B-Omni's audio path at full size on this CPU: audio encode per second of audio, prefill with it.

    python benchmarks/omni_audio.py [--quantization q4f32_1] [--threads 2] [--runs 2] [--cache-dir DIR]

Takes omni_image.py's random bf16 Omni checkpoint (building it first if needed) and adds a random
Whisper-large-v3 encoder under the vendor's names (`audio.audio.*`: 128 mel bins, 32 layers of 1280, 20
heads, 1500 positions, a projection to 2560, the begin/end embeddings) and its `audio_config`; the LLM's and
the vision tower's files are hard links, not copies. Converts and compiles it for this CPU, then runs
`bench --audio` on a synthetic 30-second clip (a full Whisper window: 1500 encoder frames, 752 audio tokens)
with a 128-token prompt and 128 generated tokens. In the same run (unless --no-torch), transformers'
WhisperEncoder, float32 with the same encoder weights and threads, encodes the same 30 seconds: the peer a
user of transformers has on a CPU (its encoder always takes the full 30-second window; megrez-mlc's takes
only the clip's frames, which for this clip is the same).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import wave
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from fullsize import ensure_checkpoint  # noqa: E402
from omni_image import (  # noqa: E402
    CHECKPOINT_NAME,
    _random_bf16,
    _write_with_header,
    built_for_cpu,
    machine,
    make_omni_checkpoint,
)

from megrez_mlc.home import megrez_home  # noqa: E402

AUDIO_CHECKPOINT_NAME = "megrez-3b-omni-audio-random-bf16"
WHISPER_LARGE_V3 = {"n_mels": 128, "n_ctx": 1500, "n_state": 1280, "n_head": 20, "n_layer": 32}
CLIP_SECONDS = 30
AUDIO_FILE = "model-audio.safetensors"


def audio_shapes(hidden: int) -> dict[str, tuple[int, ...]]:
    w, m = WHISPER_LARGE_V3["n_state"], WHISPER_LARGE_V3["n_mels"]
    a = "audio.audio"
    shapes: dict[str, tuple[int, ...]] = {
        f"{a}.conv1.weight": (w, m, 3),
        f"{a}.conv1.bias": (w,),
        f"{a}.conv2.weight": (w, w, 3),
        f"{a}.conv2.bias": (w,),
        f"{a}.positional_embedding": (WHISPER_LARGE_V3["n_ctx"], w),
    }
    for n in range(WHISPER_LARGE_V3["n_layer"]):
        b = f"{a}.blocks.{n}"
        for norm in ("attn_ln", "mlp_ln"):
            shapes |= {f"{b}.{norm}.weight": (w,), f"{b}.{norm}.bias": (w,)}
        for proj in ("query", "key", "value", "out"):
            shapes[f"{b}.attn.{proj}.weight"] = (w, w)
            if proj != "key":
                shapes[f"{b}.attn.{proj}.bias"] = (w,)
        shapes |= {
            f"{b}.mlp.0.weight": (4 * w, w),
            f"{b}.mlp.0.bias": (4 * w,),
            f"{b}.mlp.2.weight": (w, 4 * w),
            f"{b}.mlp.2.bias": (w,),
        }
    return shapes | {
        f"{a}.ln_post.weight": (w,),
        f"{a}.ln_post.bias": (w,),
        f"{a}.proj.weight": (hidden, w),
        f"{a}.proj.bias": (hidden,),
        f"{a}.audio_bos_eos_token.weight": (2, hidden),
    }


def make_audio_checkpoint(omni_dir: Path, out: Path) -> None:
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        for child in partial.iterdir():
            child.unlink()
    else:
        partial.mkdir(parents=True)
    for child in omni_dir.iterdir():
        if child.suffix == ".safetensors":
            os.link(child, partial / child.name)
    config = json.loads((omni_dir / "config.json").read_text())
    hidden = config["hidden_size"]
    config["audio_config"] = {**WHISPER_LARGE_V3, "output_dim": hidden, "avg_pool": True}
    config["audio_config"]["add_audio_bos_eos_token"] = True
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    (partial / "tokenizer.json").write_bytes((omni_dir / "tokenizer.json").read_bytes())
    shapes = audio_shapes(hidden)
    rng = np.random.default_rng(2)
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    print(f"writing {AUDIO_FILE} ({offset / 1e9:.2f} GB)")
    _write_with_header(partial / AUDIO_FILE, header, None, 0)
    with (partial / AUDIO_FILE).open("ab") as f:
        for shape in shapes.values():
            f.write(_random_bf16(shape, rng))
    index = json.loads((omni_dir / "model.safetensors.index.json").read_text())
    index["weight_map"] |= dict.fromkeys(shapes, AUDIO_FILE)
    (partial / "model.safetensors.index.json").write_text(json.dumps(index))
    partial.rename(out)


def synthetic_clip(path: Path) -> Path:
    """30 s of a voice-like signal: a wandering fundamental with harmonics, in syllable-long bursts."""
    rate = 16000
    t = np.arange(CLIP_SECONDS * rate) / rate
    phase = 2 * np.pi * (140 * t + 30 * np.sin(2 * np.pi * 0.3 * t))
    voice = sum(np.sin(k * phase) / k for k in range(1, 8)) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))
    noise = 0.02 * np.random.default_rng(0).standard_normal(t.size)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((np.clip(0.25 * voice + noise, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def torch_encoder_ms_per_second(hf_dir: Path, clip: Path, threads: int, runs: int) -> float:
    """transformers' WhisperEncoder on the checkpoint's audio weights: median ms per second of audio."""
    import statistics
    import time

    import torch
    from safetensors.torch import load_file
    from transformers import WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from megrez_mlc.omni.audio import read_audio_file

    torch.set_num_threads(threads)
    w = WHISPER_LARGE_V3
    config = WhisperConfig(
        num_mel_bins=w["n_mels"],
        d_model=w["n_state"],
        encoder_layers=w["n_layer"],
        encoder_attention_heads=w["n_head"],
        encoder_ffn_dim=4 * w["n_state"],
        max_source_positions=w["n_ctx"],
    )
    encoder = WhisperEncoder(config).eval()
    weights = {k[len("audio.audio.") :]: v.float() for k, v in load_file(str(hf_dir / AUDIO_FILE)).items()}
    names = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "out_proj"}
    state = {"conv1.weight": weights["conv1.weight"], "conv1.bias": weights["conv1.bias"]}
    state |= {"conv2.weight": weights["conv2.weight"], "conv2.bias": weights["conv2.bias"]}
    state |= {"embed_positions.weight": weights["positional_embedding"]}
    state |= {"layer_norm.weight": weights["ln_post.weight"], "layer_norm.bias": weights["ln_post.bias"]}
    for n in range(w["n_layer"]):
        b, layer = f"blocks.{n}", f"layers.{n}"
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                if f"{b}.attn.{ours}.{kind}" in weights:
                    state[f"{layer}.self_attn.{theirs}.{kind}"] = weights[f"{b}.attn.{ours}.{kind}"]
        for kind in ("weight", "bias"):
            state[f"{layer}.self_attn_layer_norm.{kind}"] = weights[f"{b}.attn_ln.{kind}"]
            state[f"{layer}.final_layer_norm.{kind}"] = weights[f"{b}.mlp_ln.{kind}"]
            state[f"{layer}.fc1.{kind}"] = weights[f"{b}.mlp.0.{kind}"]
            state[f"{layer}.fc2.{kind}"] = weights[f"{b}.mlp.2.{kind}"]
    encoder.load_state_dict(state, strict=False)  # the keys' missing biases are zero, as Whisper's are
    samples = read_audio_file(clip)
    features = WhisperFeatureExtractor(feature_size=w["n_mels"])(
        samples, sampling_rate=16000, return_tensors="pt"
    )
    timings = []
    with torch.no_grad():
        encoder(features.input_features)  # warm-up
        for _ in range(runs):
            start = time.perf_counter()
            encoder(features.input_features)
            timings.append(time.perf_counter() - start)
    return statistics.median(timings) / CLIP_SECONDS * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantization", default="q4f32_1")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--no-torch", action="store_true", help="Leave out the transformers peer.")
    args = parser.parse_args()

    from megrez_mlc.runtime.bench import run_bench

    cache = args.cache_dir or megrez_home() / "bench"
    omni_dir, hf_dir = cache / CHECKPOINT_NAME, cache / AUDIO_CHECKPOINT_NAME
    if not (omni_dir / "config.json").is_file():
        make_omni_checkpoint(ensure_checkpoint(cache), omni_dir)
    if not (hf_dir / "config.json").is_file():
        make_audio_checkpoint(omni_dir, hf_dir)
    model_dir = cache / f"megrez-3b-omni-audio-{args.quantization}"
    lib = built_for_cpu(hf_dir, model_dir, args.quantization)
    clip = synthetic_clip(cache / "omni-30s.wav")
    result = run_bench(
        model_dir, lib, prompt_len=128, gen_len=128, threads=args.threads, runs=args.runs, audio=clip
    )
    print(
        f"\nMegrez-3B-Omni shape, random weights, {args.quantization}; {machine()}, {result.threads} threads"
    )
    print(f"clip: {result.audio_seconds:.0f} s, {result.audio_tokens} audio tokens")
    peer = "-"
    if not args.no_torch:
        peer = f"{torch_encoder_ms_per_second(hf_dir, clip, result.threads, args.runs):.0f} (encoder)"
    per_second = result.audio_encode_ms_per_second
    print(f"{'':36}{'megrez-mlc':>12}{'transformers f32':>18}")
    rows = [
        ("audio encode, ms per second of audio", f"{per_second:.0f}", peer),
        ("audio encode, s per 30 s clip", f"{per_second * CLIP_SECONDS / 1e3:.1f}", ""),
        ("audio tokens", f"{result.audio_tokens}", ""),
        ("prefill (audio + 128 text) tok/s", f"{result.prefill_tok_s:.1f}", ""),
        ("decode tok/s", f"{result.decode_tok_s:.1f}", ""),
        ("peak RSS, MB", f"{result.peak_rss_mb:.0f}", ""),
    ]
    for label, ours, torch_value in rows:
        print(f"{label:<36}{ours:>12}{torch_value:>18}")


if __name__ == "__main__":
    main()
