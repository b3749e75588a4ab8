"""convert-weight accepts every checkpoint layout people download, and they all convert to the same bytes.

Each layout is written from the tiny checkpoint's weights (torch, as transformers would save them); the
oracle is the conversion of a plain float32 model.safetensors holding the same values (rounded to the
layout's dtype first), which must give byte-identical shards.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch

from megrez_mlc.artifacts.tensor_cache import load_tensors, read_index
from megrez_mlc.errors import MegrezError
from megrez_mlc.quantize.convert import convert_weight

from .conftest import run_cli

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NON_WEIGHT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


def empty_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in NON_WEIGHT_FILES:
        shutil.copyfile(src / name, dst / name)
    return dst


def torch_state(src: Path, dtype: str) -> dict[str, torch.Tensor]:
    return {
        k: torch.from_numpy(v).to(TORCH_DTYPES[dtype])
        for k, v in load_file(src / "model.safetensors").items()
    }


def split(state: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    names = list(state)
    return [{n: state[n] for n in names[i::parts]} for i in range(parts)]


def write_layout(src: Path, dst: Path, layout: str, dtype: str) -> Path:
    """The tiny checkpoint at src re-saved as `layout` in `dtype` (what a Hugging Face download holds)."""
    empty_checkpoint(src, dst)
    state = torch_state(src, dtype)
    if layout == "safetensors":
        save_torch(state, dst / "model.safetensors", metadata={"format": "pt"})
    elif layout == "bin":
        torch.save(state, dst / "pytorch_model.bin")
    else:  # sharded, with an index naming each tensor's file
        stem, suffix = (
            ("model", "safetensors") if layout == "sharded-safetensors" else ("pytorch_model", "bin")
        )
        weight_map = {}
        for i, part in enumerate(split(state, 3)):
            file_name = f"{stem}-{i + 1:05d}-of-00003.{suffix}"
            if suffix == "safetensors":
                save_torch(part, dst / file_name, metadata={"format": "pt"})
            else:
                torch.save(part, dst / file_name)
            weight_map |= dict.fromkeys(part, file_name)
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (dst / f"{stem}.{suffix}.index.json").write_text(json.dumps(index))
    return dst


def float32_reference(src: Path, dst: Path, dtype: str) -> Path:
    """The same values as write_layout's, as one float32 safetensors file."""
    empty_checkpoint(src, dst)
    state = {k: v.to(torch.float32).numpy() for k, v in torch_state(src, dtype).items()}
    save_numpy(state, str(dst / "model.safetensors"))
    return dst


def shard_bytes(model_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(model_dir.iterdir())}


@pytest.mark.parametrize(
    ("layout", "dtype"),
    [
        ("safetensors", "bfloat16"),
        ("safetensors", "float16"),
        ("sharded-safetensors", "bfloat16"),
        ("sharded-safetensors", "float32"),
        ("bin", "float32"),
        ("bin", "float16"),
        ("sharded-bin", "bfloat16"),
    ],
)
def test_layout_converts_to_the_same_bytes_as_float32_safetensors(
    tiny_hf: Path, tmp_path: Path, layout: str, dtype: str
) -> None:
    hf = write_layout(tiny_hf, tmp_path / "hf", layout, dtype)
    reference = float32_reference(tiny_hf, tmp_path / "ref", dtype)
    for quantization in ("q4f16_1", "q0f32"):
        ours = convert_weight(hf, tmp_path / f"out-{quantization}", quantization)
        expected = convert_weight(reference, tmp_path / f"ref-{quantization}", quantization)
        assert ours.num_tensors == expected.num_tensors == (25 if quantization == "q4f16_1" else 15)
        assert shard_bytes(ours.out_dir) == shard_bytes(expected.out_dir)
    # q0f32 holds the source values exactly: bf16/fp16 widened to float32 without rounding
    stored = load_tensors(tmp_path / "out-q0f32")
    source = torch_state(tiny_hf, dtype)
    assert np.array_equal(
        stored["model.layers.1.mlp.gate_up_proj.weight"],
        torch.cat(
            [source["model.layers.1.mlp.gate_proj.weight"], source["model.layers.1.mlp.up_proj.weight"]]
        )
        .to(torch.float32)
        .numpy(),
    )


def test_bf16_of_the_real_layout_matches_torch_widening(tiny_hf: Path, tmp_path: Path) -> None:
    """Our bf16 reader (no torch) agrees with torch on every value, including negative and tiny ones."""
    hf = write_layout(tiny_hf, tmp_path / "hf", "safetensors", "bfloat16")
    from megrez_mlc.quantize.checkpoint import Checkpoint

    checkpoint = Checkpoint(hf)
    for name, tensor in torch_state(tiny_hf, "bfloat16").items():
        assert checkpoint.info(name).dtype == "bfloat16"
        np.testing.assert_array_equal(checkpoint.read(name), tensor.to(torch.float32).numpy())


def test_tied_checkpoint_with_a_saved_lm_head_ignores_it(tiny_hf_tied: Path, tmp_path: Path) -> None:
    hf = empty_checkpoint(tiny_hf_tied, tmp_path / "hf")
    weights = load_file(tiny_hf_tied / "model.safetensors")
    assert "lm_head.weight" not in weights
    save_numpy(
        weights | {"lm_head.weight": weights["model.embed_tokens.weight"]}, str(hf / "model.safetensors")
    )
    ours = convert_weight(hf, tmp_path / "out", "q4f32_1")
    plain = convert_weight(tiny_hf_tied, tmp_path / "plain", "q4f32_1")
    assert shard_bytes(ours.out_dir) == shard_bytes(plain.out_dir)
    names = [r["name"] for s in read_index(ours.out_dir)["records"] for r in s["records"]]
    assert not any(n.startswith("lm_head") for n in names) and names[0] == "model.embed_tokens.q_weight"


def test_safetensors_win_over_bin_files_beside_them(tiny_hf: Path, tmp_path: Path) -> None:
    """Repos often ship both; the .bin (here a hostile pickle) is never opened."""
    hf = empty_checkpoint(tiny_hf, tmp_path / "hf")
    shutil.copyfile(tiny_hf / "model.safetensors", hf / "model.safetensors")
    marker = tmp_path / "pwned"
    torch.save({"x": Hostile(marker)}, hf / "pytorch_model.bin")
    convert_weight(hf, tmp_path / "out", "q0f32")
    assert not marker.exists()
    assert shard_bytes(tmp_path / "out") == shard_bytes(
        convert_weight(tiny_hf, tmp_path / "ref", "q0f32").out_dir
    )


class Hostile:
    """Unpickling this would create a file: torch.load(weights_only=True) must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_bin_with_arbitrary_objects_is_refused_without_running_them(tiny_hf: Path, tmp_path: Path) -> None:
    hf = empty_checkpoint(tiny_hf, tmp_path / "hf")
    marker = tmp_path / "pwned"
    state = torch_state(tiny_hf, "float32")
    torch.save({**state, "model.norm.weight": Hostile(marker)}, hf / "pytorch_model.bin")
    proc = run_cli("convert-weight", str(hf), "-q", "q0f32", "-o", str(tmp_path / "out"), check=False)
    assert proc.returncode == 1 and not marker.exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: cannot read {hf / 'pytorch_model.bin'} as a weights-only"
    )
    assert not (tmp_path / "out").exists()


def test_legacy_non_zip_bin_still_loads(tiny_hf: Path, tmp_path: Path) -> None:
    hf = empty_checkpoint(tiny_hf, tmp_path / "hf")
    torch.save(
        torch_state(tiny_hf, "float32"), hf / "pytorch_model.bin", _use_new_zipfile_serialization=False
    )
    ours = convert_weight(hf, tmp_path / "out", "q4f32_1")
    assert shard_bytes(ours.out_dir) == shard_bytes(
        convert_weight(tiny_hf, tmp_path / "ref", "q4f32_1").out_dir
    )


@pytest.mark.parametrize("mlc_file", ["mlc-chat-config.json", "tensor-cache.json"])
def test_an_already_converted_folder_passed_as_the_checkpoint(built, tmp_path: Path, mlc_file: str) -> None:
    model = built("q4f32_1")
    folder = tmp_path / "converted"
    shutil.copytree(model.model_dir, folder)
    if mlc_file == "tensor-cache.json":
        (folder / "mlc-chat-config.json").unlink()  # weights only, as convert-weight alone leaves it
    proc = run_cli("convert-weight", str(folder), "-q", "q4f32_1", "-o", str(tmp_path / "out"), check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"error: {folder} is an already-converted MLC model (it has {mlc_file}, no config.json); "
        "pass the original Hugging Face checkpoint folder"
    )


def test_folder_without_weights(tiny_hf: Path, tmp_path: Path) -> None:
    hf = empty_checkpoint(tiny_hf, tmp_path / "hf")
    with pytest.raises(MegrezError, match=r"no weights in .*: expected model.safetensors, sharded"):
        convert_weight(hf, tmp_path / "out", "q0f32")


def test_index_naming_a_missing_shard(tiny_hf: Path, tmp_path: Path) -> None:
    hf = write_layout(tiny_hf, tmp_path / "hf", "sharded-safetensors", "bfloat16")
    (hf / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(MegrezError, match=r"names model-00002-of-00003.safetensors, which is missing"):
        convert_weight(hf, tmp_path / "out", "q0f32")


def test_truncated_source_safetensors(tiny_hf: Path, tmp_path: Path) -> None:
    hf = empty_checkpoint(tiny_hf, tmp_path / "hf")
    data = (tiny_hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(MegrezError, match=r"model.safetensors is truncated: tensor .* ends at byte"):
        convert_weight(hf, tmp_path / "out", "q0f32")


def test_tensor_in_two_files(tiny_hf: Path, tmp_path: Path) -> None:
    hf = empty_checkpoint(tiny_hf, tmp_path / "hf")
    weights = load_file(tiny_hf / "model.safetensors")
    save_numpy(weights, str(hf / "model-a.safetensors"))
    save_numpy({"model.norm.weight": weights["model.norm.weight"]}, str(hf / "model-b.safetensors"))
    with pytest.raises(
        MegrezError, match=r"tensor model\.norm\.weight is in both model-a\.safetensors and model-b"
    ):
        convert_weight(hf, tmp_path / "out", "q0f32")


def test_integer_tensor_where_a_weight_belongs(tiny_hf: Path, tmp_path: Path) -> None:
    hf = empty_checkpoint(tiny_hf, tmp_path / "hf")
    weights = load_file(tiny_hf / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"].astype(np.int32)
    weights["model.position_ids"] = np.arange(8, dtype=np.int64)  # an unused integer buffer is fine
    save_numpy(weights, str(hf / "model.safetensors"))
    with pytest.raises(
        MegrezError, match=r"tensor model\.norm\.weight in model\.safetensors is int32, not a float type"
    ):
        convert_weight(hf, tmp_path / "out", "q0f32")


@pytest.mark.parametrize(("quantization", "value"), [("q4f32_1", np.nan), ("q0f16", 1e6)])
def test_values_that_cannot_be_stored(tiny_hf: Path, tmp_path: Path, quantization: str, value: float) -> None:
    hf = empty_checkpoint(tiny_hf, tmp_path / "hf")
    weights = load_file(tiny_hf / "model.safetensors")
    weights["model.layers.1.self_attn.o_proj.weight"][5, 3] = value
    save_numpy(weights, str(hf / "model.safetensors"))
    with pytest.raises(
        MegrezError, match=r"tensor model.layers.1.self_attn.o_proj.weight rows 0..71 hold NaN"
    ):
        convert_weight(hf, tmp_path / "out", quantization)
    assert not (tmp_path / "out").exists()


def test_bin_pages_released_after_a_read_are_read_again_intact(tiny_hf: Path, tmp_path: Path) -> None:
    """Reading a memory-mapped .bin drops the pages it read (to bound memory); a second read is unchanged."""
    from megrez_mlc.quantize.checkpoint import Checkpoint

    hf = write_layout(tiny_hf, tmp_path / "hf", "bin", "bfloat16")
    checkpoint = Checkpoint(hf)
    name = "model.embed_tokens.weight"  # ~46 KB: several whole pages to drop
    expected = torch_state(tiny_hf, "bfloat16")[name].to(torch.float32).numpy()
    for _ in range(2):
        np.testing.assert_array_equal(checkpoint.read(name), expected)
        np.testing.assert_array_equal(
            np.concatenate([checkpoint.read_rows(name, a, b) for a, b in checkpoint.row_ranges(name, 7)]),
            expected,
        )


def test_thread_count_does_not_change_the_output(tiny_hf: Path, tmp_path: Path) -> None:
    hf = write_layout(tiny_hf, tmp_path / "hf", "sharded-safetensors", "bfloat16")
    one = convert_weight(hf, tmp_path / "one", "q4f16_1", threads=1)
    three = convert_weight(hf, tmp_path / "three", "q4f16_1", threads=3)
    assert shard_bytes(one.out_dir) == shard_bytes(three.out_dir)
    with pytest.raises(MegrezError, match="--threads must be at least 1, got 0"):
        convert_weight(hf, tmp_path / "zero", "q4f16_1", threads=0)
