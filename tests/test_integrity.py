"""A damaged model folder is caught with one line naming the file or parameter: at load time (sizes, names,
shapes, dtypes, before TVM reads a byte) and by `megrez-mlc verify` (md5 of every shard)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from megrez_mlc.artifacts.tensor_cache import read_index
from megrez_mlc.errors import MegrezError
from megrez_mlc.runtime.model_lib import ModelLibrary

from .conftest import run_cli
from .test_bad_input import assert_clean_failure


@pytest.fixture
def model(built, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the converted q4f32_1 tiny model (to damage) and its compiled library."""
    original = built("q4f32_1")
    folder = tmp_path / "model"
    shutil.copytree(original.model_dir, folder, ignore=shutil.ignore_patterns("*.so"))
    return folder, original.lib


def edit_record(folder: Path, name: str, change: Callable[[dict], None]) -> None:
    path = folder / "tensor-cache.json"
    index = json.loads(path.read_text())
    for shard in index["records"]:
        for rec in shard["records"]:
            if rec["name"] == name:
                change(rec)
    path.write_text(json.dumps(index))


def shard_of(folder: Path, name: str) -> Path:
    for shard in read_index(folder)["records"]:
        if any(rec["name"] == name for rec in shard["records"]):
            return folder / shard["dataPath"]
    raise AssertionError(name)


def verify_error(folder: Path) -> str:
    proc = run_cli("verify", str(folder), check=False)
    assert proc.returncode == 1 and proc.stdout == "" and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    return line


def test_verify_passes_on_an_intact_model(model) -> None:
    folder, _ = model
    index = read_index(folder)
    size = sum(s["nbytes"] for s in index["records"])
    proc = run_cli("verify", str(folder))
    assert proc.stdout.strip() == (
        f"ok: {len(index['records'])} shards, {size / 2**20:.1f} MiB, 25 tensors, md5 sums match; "
        "all tensors match mlc-chat-config.json (q4f32_1)"
    )


@pytest.mark.parametrize("where", ["first", "last"])
def test_verify_catches_a_single_flipped_byte(model, where: str) -> None:
    folder, _ = model
    shard = folder / "params_shard_0.bin"
    data = bytearray(shard.read_bytes())
    data[0 if where == "first" else len(data) - 1] ^= 0x01
    shard.write_bytes(bytes(data))
    assert verify_error(folder) == (
        f"error: 1 of 1 weight shards in {folder} fail their md5 check (params_shard_0.bin): the files are "
        "corrupt or were modified; convert the weights again (or copy them again)"
    )


def test_truncated_shard_is_named_before_anything_runs(model) -> None:
    folder, lib = model
    shard = folder / "params_shard_0.bin"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:-1000])
    expected = (
        f"weight shard {shard} has {size - 1000} bytes but tensor-cache.json says {size} "
        "(truncated or modified); convert the weights again"
    )
    assert verify_error(folder) == f"error: {expected}"
    assert_clean_failure(["generate", str(folder), "--model-lib", str(lib), "--prompt", "hi"], expected)


def test_missing_shard(model) -> None:
    folder, lib = model
    (folder / "params_shard_0.bin").unlink()
    with pytest.raises(MegrezError, match=r"weight shard .*params_shard_0\.bin is missing"):
        ModelLibrary(folder, lib)


def test_missing_tensor(model) -> None:
    folder, lib = model
    name = "model.layers.1.mlp.down_proj.q_scale"
    path = folder / "tensor-cache.json"
    index = json.loads(path.read_text())
    for shard in index["records"]:
        shard["records"] = [rec for rec in shard["records"] if rec["name"] != name]
    path.write_text(json.dumps(index))
    with pytest.raises(MegrezError, match=rf"^parameter {name} is missing from .*tensor-cache\.json"):
        ModelLibrary(folder, lib)
    assert verify_error(folder).startswith(
        f"error: tensor {name} that mlc-chat-config.json (q4f32_1) implies is missing from"
    )


def test_wrong_shape(model) -> None:
    folder, lib = model
    name = "model.layers.0.self_attn.o_proj.q_weight"  # [72, 12] -> [12, 72]: same bytes, wrong shape
    edit_record(folder, name, lambda rec: rec.update(shape=rec["shape"][::-1]))
    with pytest.raises(MegrezError) as err:
        ModelLibrary(folder, lib)
    assert str(err.value) == (
        f"parameter {name} is uint32[12, 72] in {folder} but the library expects uint32[72, 12]; "
        "convert and compile from the same model and quantization"
    )
    assert verify_error(folder) == (
        f"error: tensor {name} is uint32[12, 72] in {folder / 'tensor-cache.json'} but mlc-chat-config.json "
        "(q4f32_1) implies uint32[72, 12]; convert and gen-config from the same model and quantization"
    )


def test_wrong_dtype(model) -> None:
    folder, lib = model
    name = "model.norm.weight"
    edit_record(folder, name, lambda rec: rec.update(dtype="int32"))  # same size as float32
    with pytest.raises(MegrezError) as err:
        ModelLibrary(folder, lib)
    assert str(err.value).startswith(
        f"parameter {name} is int32[72] in {folder} but the library expects float32[72]"
    )


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda rec: rec.update(byteOffset=rec["byteOffset"] + 10**6), "lies outside params_shard_0.bin"),
        (lambda rec: rec.update(nbytes=rec["nbytes"] - 4), "is float32[72] (288 bytes) but records 284"),
        (lambda rec: rec.update(dtype="float8"), "has an unknown dtype 'float8'"),
    ],
)
def test_inconsistent_index(model, change: Callable[[dict], None], problem: str) -> None:
    folder, lib = model
    edit_record(folder, "model.norm.weight", change)
    with pytest.raises(MegrezError) as err:
        ModelLibrary(folder, lib)
    assert "model.norm.weight" in str(err.value) and problem in str(err.value)
    assert str(err.value).startswith(f"{folder / 'tensor-cache.json'} is corrupt")
    assert problem in verify_error(folder)


def test_shard_path_that_leaves_the_folder(model) -> None:
    folder, lib = model
    path = folder / "tensor-cache.json"
    index = json.loads(path.read_text())
    index["records"][0]["dataPath"] = "../elsewhere.bin"
    path.write_text(json.dumps(index))
    with pytest.raises(MegrezError, match=r"corrupt \(shard path '\.\./elsewhere\.bin' leaves the folder\)"):
        ModelLibrary(folder, lib)


def test_verify_of_a_folder_without_weights(tmp_path: Path) -> None:
    assert verify_error(tmp_path) == (
        f"error: {tmp_path / 'tensor-cache.json'} not found; convert the weights first with "
        "`megrez-mlc convert-weight`"
    )
    assert verify_error(tmp_path / "nope").startswith(f"error: {tmp_path / 'nope'} is not a directory")
