"""`megrez-mlc package`: the shipped Android and iPhone package configs, run on the tiny model, give MLC's
dist/lib + dist/bundle layout with phone-architecture objects and a computed memory estimate."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from megrez_mlc.config import ModelConfig
from megrez_mlc.errors import MegrezError
from megrez_mlc.package import PackageResult, kv_cache_bytes, package, read_package_config

from .objects import ar_members, object_architecture, tar_members
from .test_bad_input import assert_clean_failure
from .test_targets import clang_opencl_errors, opencl_sections

REPO = Path(__file__).resolve().parent.parent


def shipped_config_for(model_dir: Path, device_dir: str, tmp: Path) -> Path:
    """The repository's package config for a device, pointed at `model_dir` instead of the real model."""
    config = json.loads((REPO / device_dir / "mlc-package-config.json").read_text())
    config["model_list"][0]["model"] = str(model_dir)
    path = tmp / "mlc-package-config.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="session")
def android_package(gpu_model, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PackageResult]:
    tmp = tmp_path_factory.mktemp("android-package")
    dist = tmp / "dist"
    (dist / "lib" / "mlc4j").mkdir(parents=True)
    (dist / "lib" / "mlc4j" / "build.gradle").write_text("kept")  # the app's own build output
    return dist, package(shipped_config_for(gpu_model("q4f16_1"), "android", tmp), dist)


@pytest.fixture(scope="session")
def iphone_package(gpu_model, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PackageResult]:
    tmp = tmp_path_factory.mktemp("iphone-package")
    return tmp / "dist", package(shipped_config_for(gpu_model("q4f16_1"), "ios", tmp), tmp / "dist")


def expected_vram_bytes(model_dir: Path, context_window_size: int, workspace: int) -> int:
    """Weights on disk + float16 K and V for every layer in 16-token pages (+1 spare) + the workspace."""
    index = json.loads((model_dir / "tensor-cache.json").read_text())
    params = sum(shard["nbytes"] for shard in index["records"])
    config = ModelConfig.from_mlc_dict(
        json.loads((model_dir / "mlc-chat-config.json").read_text())["model_config"]
    )
    pages = math.ceil(context_window_size / 16) + 1
    kv = config.num_hidden_layers * pages * 16 * 2 * config.num_key_value_heads * config.head_dim * 2
    return params + kv + workspace


def test_android_package(android_package, gpu_model) -> None:
    dist, result = android_package
    model_dir = gpu_model("q4f16_1")
    library = result.libraries["llama_q4f16_1"]
    assert library.output == dist / "lib" / "llama_q4f16_1.tar"
    assert library.metadata["context_window_size"] == 4096 and library.metadata["prefill_chunk_size"] == 256
    vram = expected_vram_bytes(model_dir, 4096, max(library.metadata["memory_usage"].values()))
    assert json.loads((dist / "bundle" / "mlc-app-config.json").read_text()) == {
        "model_list": [
            {
                "model_id": "megrez-3b-instruct-q4f16_1-MLC",
                "model_lib": "llama_q4f16_1",
                "model_url": "https://huggingface.co/YOUR-HF-USER/megrez-3b-instruct-q4f16_1-MLC",
                "estimated_vram_bytes": vram,
            }
        ]
    }
    # bundled weights and tokenizer, byte for byte; the chat config carries the library's context window
    bundle = dist / "bundle" / "megrez-3b-instruct-q4f16_1-MLC"
    copied = sorted(p.name for p in bundle.iterdir())
    assert copied == sorted(
        ["mlc-chat-config.json", "tensor-cache.json", "tokenizer.json", "tokenizer_config.json"]
        + [p.name for p in model_dir.glob("params_shard_*.bin")]
    )
    for name in copied:
        if name != "mlc-chat-config.json":
            assert (bundle / name).read_bytes() == (model_dir / name).read_bytes(), name
    chat_config = json.loads((bundle / "mlc-chat-config.json").read_text())
    assert chat_config["context_window_size"] == chat_config["model_config"]["context_window_size"] == 4096
    assert chat_config["prefill_chunk_size"] == 256
    assert (dist / "lib" / "mlc4j" / "build.gradle").read_text() == "kept"


def test_android_library_is_aarch64_with_its_prefix(android_package) -> None:
    dist, result = android_package
    members = tar_members(dist / "lib" / "llama_q4f16_1.tar")
    assert {object_architecture(data) for data in members.values()} == {"elf64-aarch64"}
    assert any(b"llama_q4f16_1___tvm_ffi__library_bin" in data for data in members.values())
    if shutil.which("llvm-ar") is None:
        assert result.static_archive is None
        pytest.skip("llvm-ar is not installed, so no libmodel_android.a was made")
    archive = dist / "lib" / "libmodel_android.a"
    assert result.static_archive == archive
    assert {object_architecture(d) for d in ar_members(archive).values()} == {"elf64-aarch64"}
    symbols = subprocess.run(["llvm-nm", str(archive)], capture_output=True, text=True, check=True).stdout
    # the global symbol MLC's app finds the model library by
    assert re.search(r"^\w+ [A-Z] llama_q4f16_1___tvm_ffi__library_bin$", symbols, flags=re.MULTILINE)


def test_android_float16_kernels_pass_clang(android_package) -> None:
    """The phone build's OpenCL (float16, Adreno-style schedules) type-checks in clang's OpenCL front end."""
    _, result = android_package
    library = result.libraries["llama_q4f16_1"]
    sections = opencl_sections(library.device_source)
    assert set(sections) == {f"{name}_kernel" for name in library.device_functions}
    for name, section in sections.items():
        errors, defined = clang_opencl_errors(section)
        assert not errors, (name, errors[:3])
        assert name in defined


def test_android_bundle_without_model_url_as_mlc_writes_it(gpu_model, tmp_path: Path) -> None:
    """MLC's own Android config for a local folder: "bundle_weight": true and no model_url. As `mlc_llm
    package`, the app config's model_url is then the "model" value as written (MLCChat for Android needs one
    for every model; with the weights pushed to the phone it never uses it)."""
    model_dir = gpu_model("q4f16_1")
    relative = os.path.relpath(model_dir, tmp_path)
    config = write_config(
        tmp_path,
        {
            "device": "android",
            "model_list": [
                {"model": relative, "model_id": "bundled", "bundle_weight": True},
                {
                    "model": relative,
                    "model_id": "hosted",
                    "model_url": "https://example.com/m",
                    "estimated_vram_bytes": 123,
                },
            ],
        },
    )
    dist = tmp_path / "dist"
    result = package(config, dist)
    library = result.libraries["llama_q4f16_1"]
    window = library.metadata["context_window_size"]
    vram = expected_vram_bytes(model_dir, window, max(library.metadata["memory_usage"].values()))
    assert json.loads((dist / "bundle" / "mlc-app-config.json").read_text()) == {
        "model_list": [
            {
                "model_id": "bundled",
                "model_lib": "llama_q4f16_1",
                "model_url": relative,
                "estimated_vram_bytes": vram,
            },
            {
                "model_id": "hosted",
                "model_lib": "llama_q4f16_1",
                "model_url": "https://example.com/m",
                "estimated_vram_bytes": 123,
            },
        ]
    }
    assert sorted(p.name for p in (dist / "bundle").iterdir()) == ["bundled", "mlc-app-config.json"]
    bundle = dist / "bundle" / "bundled"
    weights = ["tensor-cache.json", *(p.name for p in model_dir.glob("params_shard_*.bin"))]
    tokenizer = json.loads((model_dir / "mlc-chat-config.json").read_text())["tokenizer_files"]
    assert sorted(p.name for p in bundle.iterdir()) == sorted([*weights, *tokenizer, "mlc-chat-config.json"])
    for name in [*weights, *tokenizer]:
        assert (bundle / name).read_bytes() == (model_dir / name).read_bytes(), name


def test_iphone_package(iphone_package, gpu_model) -> None:
    dist, result = iphone_package
    library = result.libraries["llama_q4f16_1"]
    app_config = json.loads((dist / "bundle" / "mlc-app-config.json").read_text())
    vram = expected_vram_bytes(gpu_model("q4f16_1"), 4096, max(library.metadata["memory_usage"].values()))
    assert app_config == {
        "model_list": [
            {
                "model_id": "megrez-3b-instruct-q4f16_1-MLC",
                "model_lib": "llama_q4f16_1",
                "model_path": "megrez-3b-instruct-q4f16_1-MLC",
                "estimated_vram_bytes": vram,
            }
        ]
    }
    assert (dist / "bundle" / "megrez-3b-instruct-q4f16_1-MLC" / "tensor-cache.json").is_file()
    members = tar_members(dist / "lib" / "llama_q4f16_1.tar")
    assert {object_architecture(data) for data in members.values()} == {"macho64-arm64"}
    kernels = set(re.findall(r"^kernel void (\w+)\(", library.device_source, flags=re.MULTILINE))
    assert kernels == {f"{name}_kernel" for name in library.device_functions}
    if shutil.which("llvm-ar") is None:
        pytest.skip("llvm-ar is not installed, so no libmodel_iphone.a was made")
    archive = dist / "lib" / "libmodel_iphone.a"
    assert {object_architecture(d) for d in ar_members(archive).values()} == {"macho64-arm64"}
    symbols = subprocess.run(["llvm-nm", str(archive)], capture_output=True, text=True, check=True).stdout
    # global, and with the "_" every Mach-O C symbol starts with
    assert re.search(r"^\w+ [A-Z] _llama_q4f16_1___tvm_ffi__library_bin$", symbols, flags=re.MULTILINE)


def test_kv_cache_bytes_of_megrez_3b() -> None:
    """32 layers x (4096/16 + 1 pages) x 16 tokens x K,V x 10 heads x 64 x float16."""
    megrez = ModelConfig(
        hidden_size=2560,
        intermediate_size=7168,
        num_hidden_layers=32,
        num_attention_heads=40,
        num_key_value_heads=10,
        head_dim=64,
        vocab_size=122880,
        rms_norm_eps=1e-5,
        rope_theta=5e6,
        context_window_size=32768,
        tie_word_embeddings=False,
    )
    assert kv_cache_bytes(megrez, 2, 4096) == 32 * 257 * 16 * 2 * 10 * 64 * 2 == 336_855_040


# --- bad package configs ------------------------------------------------------------------------------------


def write_config(tmp_path: Path, config: object) -> Path:
    path = tmp_path / "mlc-package-config.json"
    path.write_text(json.dumps(config))
    return path


def entry(model_dir: Path, **fields: object) -> dict:
    return {"model": str(model_dir), "model_id": "megrez", "model_url": "https://example.com/m", **fields}


@pytest.mark.parametrize(
    ("make_config", "message"),
    [
        (lambda m: {"model_list": [entry(m)]}, '"device" must be one of android, iphone'),
        (lambda m: {"device": "ios", "model_list": [entry(m)]}, "got 'ios'"),
        (lambda m: {"device": "android", "model_list": []}, '"model_list" must be a non-empty list'),
        (lambda m: {"device": "android", "model_list": [entry(m, model_url=None)]}, 'needs "model_url"'),
        (
            lambda m: {"device": "iphone", "model_list": [entry(m, model_url=None)]},
            'or "bundle_weight": true',
        ),
        (lambda m: {"device": "android", "model_list": [entry(m, model="HF://x/y")]}, "downloads nothing"),
        (
            lambda m: {"device": "android", "model_list": [entry(m, overrides={"tp": 2})]},
            '"overrides" may set',
        ),
        (
            lambda m: {"device": "android", "model_list": [entry(m), entry(m)]},
            "model_id values must be unique",
        ),
        (
            lambda m: {
                "device": "android",
                "model_list": [entry(m), entry(m, model_id="b", overrides={"context_window_size": 64})],
            },
            "give 'b' its own model_lib",
        ),
        (lambda m: {"device": "android", "model_list": [entry(m, model_lib="ll")]}, "at least 8"),
        (lambda m: {"device": "android", "model_list": [entry(m, model_id="../x")]}, "no slashes"),
    ],
)
def test_bad_package_configs(gpu_model, tmp_path: Path, make_config, message: str) -> None:
    config = make_config(gpu_model("q4f16_1"))
    for model in config.get("model_list", []):
        if model.get("model_url") is None:
            model.pop("model_url", None)
    with pytest.raises(MegrezError, match=re.escape(message)):
        read_package_config(write_config(tmp_path, config))


def test_package_errors_are_one_line_and_write_nothing(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    assert_clean_failure(
        ["package", "--package-config", str(tmp_path / "missing.json"), "-o", str(dist)], "not found", dist
    )


def test_a_failed_package_writes_nothing(built, tmp_path: Path) -> None:
    """tiny_hf's head_dim of 18 is one TVM's GPU attention kernels do not support: the compile is refused."""
    config = write_config(tmp_path, {"device": "android", "model_list": [entry(built("q4f16_1").model_dir)]})
    dist = tmp_path / "out" / "dist"
    with pytest.raises(MegrezError, match="opencl attention kernels do not support head_dim=18"):
        package(config, dist)
    assert list((tmp_path / "out").iterdir()) == []
