"""`package`: the model libraries and app bundle MLC's phone apps (MLCChat for Android and iOS) build with.

Input, MLC's mlc-package-config.json:
  {"device": "android" | "iphone",
   "model_list": [{"model": converted model folder (relative paths: from the config file's folder),
                   "model_id": name shown in the app,
                   "estimated_vram_bytes": optional, computed when absent,
                   "bundle_weight": copy the weights into the bundle (default false),
                   "overrides": {"context_window_size", "prefill_chunk_size", "max_batch_size"},
                   "model_lib": optional system-library name (default "llama_<quantization>"),
                   "model_url": where the app downloads the weights (needed unless bundle_weight)}]}
Output, as `mlc_llm package` writes it:
  OUT/lib/<model_lib>.tar         each model library: static objects, symbols prefixed "<model_lib>_"
  OUT/lib/libmodel_<device>.a     all of them in the static archive the app's build links (needs llvm-ar)
  OUT/bundle/mlc-app-config.json  {"model_list": [{model_id, model_lib, model_url | model_path,
                                                   estimated_vram_bytes}]}
                                  (model_path = model_id for weights bundled on iPhone; model_url is the
                                  given one, or else the "model" value as written, as MLC writes it)
  OUT/bundle/<model_id>/          weights, mlc-chat-config.json and tokenizer files, when bundle_weight
Files of OUT this verb does not write (the app's mlc4j build, say) are left alone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .artifacts.chat_config import ChatConfig, read_chat_config
from .artifacts.files import INDEX_FILE
from .artifacts.tensor_cache import check_shard_sizes, read_index, tensor_records
from .compile.compiler import CompileResult, check_system_lib_prefix, compile_model, default_model_lib
from .config import ModelConfig
from .errors import MegrezError
from .runtime.model_lib import PAGE_SIZE
from .staging import check_writable

log = logging.getLogger("megrez_mlc")

# The MLC app device -> our compile target and the archive format its linker reads.
DEVICES = {"android": ("android", "gnu"), "iphone": ("iphone", "darwin")}
OVERRIDES = ("context_window_size", "prefill_chunk_size", "max_batch_size")
APP_CONFIG_FILE = "mlc-app-config.json"


@dataclass(frozen=True)
class ModelEntry:
    model: str  # as the package config writes it
    model_dir: Path
    model_id: str
    model_lib: str
    bundle_weight: bool
    overrides: dict[str, int]
    model_url: str | None
    estimated_vram_bytes: int | None
    chat_config: ChatConfig

    def library_settings(self) -> tuple:
        """What the compiled library depends on: entries sharing a model_lib must agree on it."""
        return (
            self.chat_config.model_config,
            self.chat_config.quantization,
            tuple(sorted(self.overrides.items())),
        )


@dataclass(frozen=True)
class PackageResult:
    app_config: dict[str, Any]
    libraries: dict[str, CompileResult]  # model_lib -> its compile (output paths in OUT/lib)
    static_archive: Path | None


def kv_cache_bytes(config: ModelConfig, dtype_bytes: int, context_window_size: int) -> int:
    """Bytes of TVM's paged KV cache holding `context_window_size` tokens: K and V of every layer, in pages
    of PAGE_SIZE tokens, plus the one spare page the runtime allocates (paged_kv_cache.cc)."""
    pages = -(-context_window_size // PAGE_SIZE) + 1
    per_page = 2 * config.num_key_value_heads * PAGE_SIZE * config.head_dim * dtype_bytes
    return config.num_hidden_layers * pages * per_page


def estimate_vram_bytes(model_dir: Path, chat_config: ChatConfig, library: CompileResult) -> int:
    """Weights + KV cache for the library's context window + the largest function workspace."""
    params = sum(rec.nbytes for rec in tensor_records(read_index(model_dir)).values())
    dtype_bytes = 2 if library.kv_cache_dtype == "float16" else 4
    kv_cache = kv_cache_bytes(chat_config.model_config, dtype_bytes, library.metadata["context_window_size"])
    return params + kv_cache + max(library.metadata["memory_usage"].values())


def read_package_config(path: Path) -> tuple[str, list[ModelEntry]]:
    if not path.is_file():
        raise MegrezError(f"package config {path} not found")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MegrezError(f"package config {path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise MegrezError(f"package config {path} must be a JSON object with device and model_list")
    device = config.get("device")
    if device not in DEVICES:
        raise MegrezError(f'{path}: "device" must be one of {", ".join(DEVICES)}, got {device!r}')
    models = config.get("model_list")
    if not isinstance(models, list) or not models:
        raise MegrezError(f'{path}: "model_list" must be a non-empty list of models')
    entries = [_read_entry(path, i, raw) for i, raw in enumerate(models)]
    ids = [e.model_id for e in entries]
    if len(set(ids)) != len(ids):
        raise MegrezError(f"{path}: model_id values must be unique, got {ids}")
    settings: dict[str, tuple] = {}
    for entry in entries:
        if settings.setdefault(entry.model_lib, entry.library_settings()) != entry.library_settings():
            raise MegrezError(
                f"{path}: models sharing model_lib {entry.model_lib!r} need the same model shape, "
                f"quantization and overrides; give {entry.model_id!r} its own model_lib"
            )
    return device, entries


def _read_entry(path: Path, index: int, raw: Any) -> ModelEntry:
    where = f"{path}: model_list[{index}]"
    if not isinstance(raw, dict):
        raise MegrezError(f"{where} must be an object")
    for key in ("model", "model_id"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise MegrezError(f'{where} needs "{key}" (a string)')
    if any(c in raw["model_id"] for c in "/\\") or raw["model_id"] in (".", ".."):
        raise MegrezError(f"{where}: model_id {raw['model_id']!r} names a folder of the bundle; no slashes")
    if raw["model"].startswith(("HF://", "http://", "https://")):
        raise MegrezError(
            f"{where}: model {raw['model']} is remote; megrez-mlc downloads nothing, so convert the weights "
            "and point model at the local folder (put the download address in model_url)"
        )
    model_dir, chat_config = read_chat_config((path.parent / raw["model"]).resolve())
    overrides = raw.get("overrides", {})
    if not isinstance(overrides, dict) or set(overrides) - set(OVERRIDES):
        raise MegrezError(f'{where}: "overrides" may set {", ".join(OVERRIDES)}, got {overrides}')
    for key, value in overrides.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise MegrezError(f"{where}: override {key} must be a positive integer, got {value!r}")
    bundle_weight = raw.get("bundle_weight", False)
    vram = raw.get("estimated_vram_bytes")
    model_url = raw.get("model_url")
    if not isinstance(bundle_weight, bool):
        raise MegrezError(f'{where}: "bundle_weight" must be true or false')
    if vram is not None and (not isinstance(vram, int) or vram <= 0):
        raise MegrezError(f'{where}: "estimated_vram_bytes" must be a positive integer (or left out)')
    if model_url is None and not bundle_weight:
        raise MegrezError(
            f'{where} needs "model_url" (where the converted folder is hosted, for the app to download) or '
            '"bundle_weight": true (the weights go into the bundle)'
        )
    if model_url is not None and not (
        isinstance(model_url, str) and model_url.startswith(("https://", "http://"))
    ):
        raise MegrezError(f'{where}: "model_url" must be an http(s) address, got {model_url!r}')
    model_lib = raw.get("model_lib", default_model_lib(chat_config.quantization))
    check_system_lib_prefix(f"{model_lib}_")
    return ModelEntry(
        model=raw["model"],
        model_dir=model_dir,
        model_id=raw["model_id"],
        model_lib=model_lib,
        bundle_weight=bundle_weight,
        overrides=dict(overrides),
        model_url=model_url,
        estimated_vram_bytes=vram,
        chat_config=chat_config,
    )


def package(package_config: Path, output: Path) -> PackageResult:
    device, entries = read_package_config(package_config)
    target, archive_format = DEVICES[device]
    # Before compiling, which takes a while: OUT is replaced beside itself, its lib and bundle in place.
    for folder in (output, output / "lib", output / "bundle"):
        check_writable(folder, folder=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.package-") as tmp:
        staging = Path(tmp)
        (staging / "lib").mkdir()
        (staging / "bundle").mkdir()
        libraries: dict[str, CompileResult] = {}
        app_models = []
        for entry in entries:
            if entry.model_lib not in libraries:
                log.info("compiling %s for %s", entry.model_lib, device)
                libraries[entry.model_lib] = compile_model(
                    entry.model_dir,
                    target,
                    staging / "lib" / f"{entry.model_lib}.tar",
                    system_lib_prefix=f"{entry.model_lib}_",
                    **entry.overrides,
                )
            library = libraries[entry.model_lib]
            if entry.bundle_weight:
                bundle_model(entry, library, staging / "bundle" / entry.model_id)
            app_models.append(app_config_entry(entry, library, device))
        app_config = {"model_list": app_models}
        (staging / "bundle" / APP_CONFIG_FILE).write_text(json.dumps(app_config, indent=2) + "\n")
        archive_name = f"libmodel_{device}.a"
        made = make_static_archive(
            [r.output for r in libraries.values()], staging / "lib" / archive_name, archive_format
        )
        _move_into(staging, output)
    moved = {
        name: dataclasses.replace(result, output=output / "lib" / result.output.name)
        for name, result in libraries.items()
    }
    return PackageResult(app_config, moved, output / "lib" / archive_name if made else None)


def app_config_entry(entry: ModelEntry, library: CompileResult, device: str) -> dict[str, Any]:
    record: dict[str, Any] = {"model_id": entry.model_id, "model_lib": entry.model_lib}
    if entry.bundle_weight and device == "iphone":
        record["model_path"] = entry.model_id  # the iOS app reads bundled weights from bundle/<model_path>
    else:
        # As `mlc_llm package` writes it: MLCChat for Android needs a model_url for every model even when
        # the weights are pushed to the phone (it downloads from there only when they are missing).
        record["model_url"] = entry.model_url or entry.model
    record["estimated_vram_bytes"] = entry.estimated_vram_bytes or estimate_vram_bytes(
        entry.model_dir, entry.chat_config, library
    )
    return record


def bundle_model(entry: ModelEntry, library: CompileResult, target: Path) -> None:
    """Copy the weights, tokenizer files and mlc-chat-config.json (with the library's context window and
    prefill chunk, so the app's engine and the library agree) into the bundle."""
    index = read_index(entry.model_dir)
    check_shard_sizes(entry.model_dir, index)
    target.mkdir(parents=True)
    for name in [INDEX_FILE, *(shard["dataPath"] for shard in index["records"])]:
        shutil.copyfile(entry.model_dir / name, target / name)
    for name in entry.chat_config.tokenizer_files:
        shutil.copyfile(entry.model_dir / name, target / name)
    config = entry.chat_config
    config.replace(
        model_config=config.model_config.replace(context_window_size=library.metadata["context_window_size"]),
        prefill_chunk_size=library.metadata["prefill_chunk_size"],
    ).write(target)


def make_static_archive(libraries: list[Path], archive: Path, archive_format: str) -> bool:
    """All objects of the .tar libraries in one static archive (`llvm-ar`, which reads every object format);
    False, with a warning, when llvm-ar is not installed."""
    llvm_ar = shutil.which("llvm-ar")
    if llvm_ar is None:
        log.warning(
            "llvm-ar not found, so %s was not made; archive the .tar libraries' objects yourself "
            "(android/README.md)",
            archive.name,
        )
        return False
    with tempfile.TemporaryDirectory() as tmp:
        objects = []
        for library in libraries:
            with tarfile.open(library) as tar:
                for member in tar.getmembers():
                    # Every library has a lib0.o: name the objects after their library so none is overwritten.
                    extracted = Path(tmp) / f"{library.stem}_{Path(member.name).name}"
                    extracted.write_bytes(tar.extractfile(member).read())
                    objects.append(str(extracted))
        subprocess.run([llvm_ar, "rcs", f"--format={archive_format}", str(archive), *objects], check=True)
    return True


def _move_into(staging: Path, output: Path) -> None:
    """Replace the files and folders of `output` that this run wrote; leave every other file alone."""
    for sub in ("lib", "bundle"):
        (output / sub).mkdir(parents=True, exist_ok=True)
        for item in (staging / sub).iterdir():
            final = output / sub / item.name
            if final.is_dir():
                shutil.rmtree(final)
            os.replace(item, final)
