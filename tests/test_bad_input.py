"""Bad input: one clear line on stderr, a non-zero exit, no traceback, and no half-written output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.numpy import load_file, save_file

from .conftest import run_cli


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def assert_clean_failure(args: list[str], message: str, output: Path | None = None) -> None:
    proc = run_cli(*args, check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    if output is not None:
        assert not output.exists()
        assert not list(output.parent.glob(f".{output.name}*"))  # no staging leftovers


def test_missing_config_json(tiny_hf: Path, tmp_path: Path) -> None:
    hf = copy_checkpoint(tiny_hf, tmp_path / "hf")
    (hf / "config.json").unlink()
    out = tmp_path / "out"
    assert_clean_failure(
        ["convert-weight", str(hf), "-q", "q4f32_1", "-o", str(out)], "config.json not found", out
    )


def test_missing_tensor(tiny_hf: Path, tmp_path: Path) -> None:
    hf = copy_checkpoint(tiny_hf, tmp_path / "hf")
    weights = load_file(hf / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, hf / "model.safetensors")
    out = tmp_path / "out"
    assert_clean_failure(
        ["convert-weight", str(hf), "-q", "q4f32_1", "-o", str(out)],
        "tensor model.layers.1.mlp.up_proj.weight is missing",
        out,
    )


def test_shape_disagrees_with_config(tiny_hf: Path, tmp_path: Path) -> None:
    hf = copy_checkpoint(tiny_hf, tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config["intermediate_size"] += 4
    (hf / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert_clean_failure(
        ["convert-weight", str(hf), "-q", "q0f32", "-o", str(out)],
        "tensor model.layers.0.mlp.gate_proj.weight has shape [100, 72] but config.json implies [104, 72]",
        out,
    )


@pytest.mark.parametrize("verb", ["convert-weight", "gen-config"])
def test_unknown_quantization(tiny_hf: Path, tmp_path: Path, verb: str) -> None:
    out = tmp_path / "out"
    assert_clean_failure(
        [verb, str(tiny_hf), "-q", "q3f8", "-o", str(out)], "unknown quantization 'q3f8'", out
    )


def test_missing_model_lib(built, tmp_path: Path) -> None:
    model = built("q4f32_1")
    missing = tmp_path / "nope.so"
    assert_clean_failure(
        ["generate", str(model.model_dir), "--model-lib", str(missing), "--prompt", "hi"],
        f"model library {missing} not found",
    )


def test_unknown_target(built, tmp_path: Path) -> None:
    model = built("q4f32_1")
    out = tmp_path / "lib.so"
    assert_clean_failure(
        ["compile", str(model.model_dir), "--target", "tpu", "-o", str(out)], "unknown target", out
    )


def test_compile_of_a_raw_checkpoint_says_what_to_run(tiny_hf: Path, tmp_path: Path) -> None:
    out = tmp_path / "lib.so"
    assert_clean_failure(
        ["compile", str(tiny_hf), "-o", str(out)], "run convert-weight and gen-config first", out
    )


def test_library_and_weights_of_different_quantizations(built) -> None:
    q4, q0 = built("q4f32_1"), built("q0f32")
    assert_clean_failure(
        ["generate", str(q0.model_dir), "--model-lib", str(q4.lib), "--prompt", "hi"],
        "parameter model.embed_tokens.q_weight is missing",
    )


def test_prompt_longer_than_context_window(built) -> None:
    model = built("q4f32_1")
    assert_clean_failure(
        [
            "generate",
            str(model.model_dir),
            "--model-lib",
            str(model.lib),
            "--raw",
            "--prompt",
            "hello " * 600,
        ],
        "but the context window is 512",
    )


def test_refuses_to_write_into_a_foreign_folder(tiny_hf: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    proc = run_cli("convert-weight", str(tiny_hf), "-q", "q0f32", "-o", str(out), check=False)
    assert proc.returncode == 1 and "pass --force" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    run_cli("convert-weight", str(tiny_hf), "-q", "q0f32", "-o", str(out), "--force")
    assert (out / "notes.txt").read_text() == "mine" and (out / "tensor-cache.json").is_file()
