"""What `megrez-mlc chat MODEL` accepts, and how it becomes a converted folder plus a model library.

MODEL is a folder made by gen-config (it holds mlc-chat-config.json), a Hugging Face checkpoint folder
(config.json), or `HF://org/name` (downloaded with huggingface_hub into its usual cache). Whatever is
missing is built on first use into $MEGREZ_MLC_HOME, under names keyed by everything the result depends
on, so the next start finds it ready and a changed input never picks up a stale build:

    models/<name>-<quantization>-<key>/   convert-weight + gen-config output
                                          (key: the checkpoint's files, quantization, megrez-mlc version)
    libs/<name>-<target>-<key>.so         compile output (key: mlc-chat-config.json, the TVM target,
                                          megrez-mlc and TVM versions)
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .artifacts.chat_config import read_chat_config
from .artifacts.files import CHAT_CONFIG_FILE
from .errors import MegrezError
from .home import megrez_home

log = logging.getLogger("megrez_mlc")

HF_SCHEME = "hf://"
# What a Hugging Face checkpoint needs; the .bin weights only when the repository has no safetensors.
HUB_PATTERNS = ("*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model")
HUB_TORCH_PATTERNS = ("pytorch_model*.bin",)


@dataclass(frozen=True)
class PreparedModel:
    model_dir: Path
    model_lib: Path


def default_quantization(device: str) -> str:
    """int4 weights; float32 activations on a CPU (float16 arithmetic is slow there), float16 on GPUs,
    except a WebGPU adapter without shader-f16 (float32 then)."""
    kind = device.partition(":")[0]
    if kind == "cpu":
        return "q4f32_1"
    from .webgpu import DEVICE_BACKENDS, device_adapter

    if kind in DEVICE_BACKENDS:
        return "q4f16_1" if device_adapter(kind).shader_f16 else "q4f32_1"
    return "q4f16_1"


def prepare_model(
    model: str, *, model_lib: Path | None = None, device: str = "cpu", quantization: str | None = None
) -> PreparedModel:
    """A converted folder and a library for MODEL, converting, compiling (or downloading) what is missing."""
    source = (
        download_from_hub(model[len(HF_SCHEME) :]) if model.lower().startswith(HF_SCHEME) else Path(model)
    )
    if source.is_file() and source.name == CHAT_CONFIG_FILE:
        source = source.parent
    if (source / CHAT_CONFIG_FILE).is_file():
        model_dir = source
        converted_as = read_chat_config(model_dir)[1].quantization
        if quantization and quantization != converted_as:
            raise MegrezError(
                f"{model_dir} is already converted to {converted_as}; --quantization applies to Hugging Face "
                "checkpoints (pass the checkpoint folder instead)"
            )
    elif (source / "config.json").is_file():
        model_dir = converted_model(source, quantization or default_quantization(device))
    else:
        raise MegrezError(
            f"{model} is not a model: pass a folder made by `megrez-mlc gen-config` (with "
            f"{CHAT_CONFIG_FILE}), a Hugging Face checkpoint folder (with config.json), or HF://org/name"
        )
    return PreparedModel(model_dir, model_lib or compiled_library(model_dir, device))


def download_from_hub(repo_id: str) -> Path:
    """The local snapshot of a Hugging Face Hub repository (its cache is reused; offline it must be there)."""
    try:
        from huggingface_hub import snapshot_download

        snapshot = Path(snapshot_download(repo_id, allow_patterns=list(HUB_PATTERNS)))
        if not any(snapshot.glob("*.safetensors")):
            snapshot = Path(snapshot_download(repo_id, allow_patterns=list(HUB_TORCH_PATTERNS)))
    except ImportError:
        raise MegrezError("HF:// models need huggingface_hub: pip install huggingface_hub") from None
    except Exception as err:  # offline, unknown repository, gated model, interrupted transfer...
        reason = " ".join(str(err).split())[:200]
        raise MegrezError(
            f"cannot download {repo_id} from the Hugging Face Hub ({type(err).__name__}: {reason}); check "
            "the network and the name, or download the checkpoint yourself and pass its folder"
        ) from None
    return snapshot


def _key(parts: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def checkpoint_fingerprint(hf_dir: Path) -> list[tuple[str, int, int]]:
    """Name, size and modification time of each file: a changed checkpoint gets a new key, and nothing
    has to read gigabytes of weights to find out."""
    files = sorted(p for p in hf_dir.iterdir() if p.is_file())
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def converted_model(hf_dir: Path, quantization: str) -> Path:
    """convert-weight + gen-config of a checkpoint into the cache, once."""
    from .quantize.convert import convert_weight
    from .quantize.gen_config import gen_config

    hf_dir = hf_dir.resolve()
    key = _key(
        {
            "checkpoint": [str(hf_dir), checkpoint_fingerprint(hf_dir)],
            "quantization": quantization,
            "megrez_mlc": __version__,
        }
    )
    out = megrez_home() / "models" / f"{hf_dir.name}-{quantization}-{key}"
    if (out / CHAT_CONFIG_FILE).is_file():
        return out
    start = time.perf_counter()
    log.info("converting %s to %s into %s (first start only)", hf_dir, quantization, out)
    # Each step stages its files and moves them in whole, and mlc-chat-config.json comes last: a folder
    # without it is an interrupted conversion, which the next start redoes over its own earlier output.
    convert_weight(hf_dir, out, quantization)
    gen_config(hf_dir, out, quantization)
    log.info("converted in %.1f s", time.perf_counter() - start)
    return out


def _compiler_digest() -> str:
    """A hash of the compiler's own source: a checkout whose kernels changed, at the same version, must not
    reuse a library compiled before."""
    digest = hashlib.sha256()
    for source in sorted((Path(__file__).parent / "compile").glob("*.py")):
        digest.update(source.read_bytes())
    return digest.hexdigest()


def compiled_library(model_dir: Path, device: str) -> Path:
    """The model library for a converted folder on a device, compiled into the cache once."""
    import tvm

    from .compile.compiler import compile_model
    from .compile.targets import TARGETS

    target_name = device.partition(":")[0]
    if target_name not in TARGETS:
        raise MegrezError(
            f"megrez-mlc cannot compile for device {device} (targets: {', '.join(TARGETS)}); "
            "pass a library built elsewhere with --model-lib"
        )
    preset = TARGETS[target_name]
    chat_config = (model_dir / CHAT_CONFIG_FILE).read_bytes()
    key = _key(
        {
            "chat_config": hashlib.sha256(chat_config).hexdigest(),
            "target": str(preset.make(output=Path(f"model{preset.local_suffix}"))),
            "megrez_mlc": __version__,
            "compiler": _compiler_digest(),
            "tvm": tvm.__version__,
        }
    )
    lib = megrez_home() / "libs" / f"{model_dir.resolve().name}-{target_name}-{key}{preset.local_suffix}"
    if lib.is_file():
        return lib
    log.info("compiling the model library for %s into %s (first start only)", target_name, lib)
    result = compile_model(model_dir, target_name, lib)
    log.info("compiled in %.1f s", result.seconds)
    return lib
