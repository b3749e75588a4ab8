"""Bad input: one clear line on stderr, a non-zero exit, no traceback, and no half-written output."""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from megrez_mlc.cli import main
from megrez_mlc.errors import MegrezError
from megrez_mlc.runtime import Engine
from megrez_mlc.runtime.sampling import SamplingParams

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


# --- options out of range: refused while parsing, before anything is read or loaded -------------------------

# MODEL and --model-lib need not exist: the values are refused before either is opened.
GENERATE = ["generate", "no-model", "--model-lib", "no-lib.so", "--prompt", "hi"]
SERVE = ["serve", "no-model", "--model-lib", "no-lib.so"]
BENCH = ["bench", "no-model", "--model-lib", "no-lib.so"]


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            [*GENERATE, "--temperature", "nan"],
            "--temperature must be a finite number >= 0 (0 = greedy), got nan",
        ),
        (
            [*GENERATE, "--temperature", "inf"],
            "--temperature must be a finite number >= 0 (0 = greedy), got inf",
        ),
        (
            [*GENERATE, "--temperature", "-1"],
            "--temperature must be a finite number >= 0 (0 = greedy), got -1.0",
        ),
        ([*GENERATE, "--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
        ([*GENERATE, "--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
        ([*GENERATE, "--top-p", "nan"], "--top-p must be in (0, 1], got nan"),
        ([*GENERATE, "--top-k", "-1"], "--top-k must be an integer >= 0 (0 = no top-k cut), got -1"),
        (
            [*GENERATE, "--repetition-penalty", "0"],
            "--repetition-penalty must be a finite number > 0 (1 = none), got 0.0",
        ),
        (
            [*GENERATE, "--repetition-penalty", "inf"],
            "--repetition-penalty must be a finite number > 0 (1 = none), got inf",
        ),
        ([*GENERATE, "--seed", "-1"], "--seed must be an integer >= 0, got -1"),
        ([*GENERATE, "--max-tokens", "0"], "--max-tokens must be an integer >= 1, got 0"),
        (["chat", "no-model", "--max-tokens", "-5"], "--max-tokens must be an integer >= 1, got -5"),
        (
            ["chat", "no-model", "--temperature", "nan"],
            "--temperature must be a finite number >= 0 (0 = greedy), got nan",
        ),
        ([*SERVE, "--port", "70000"], "--port must be from 1 to 65535, got 70000"),
        ([*SERVE, "--port", "0"], "--port must be from 1 to 65535, got 0"),
        ([*SERVE, "--port", "-1"], "--port must be from 1 to 65535, got -1"),
        ([*SERVE, "--max-total-seq-len", "0"], "--max-total-seq-len must be at least 1, got 0"),
        ([*SERVE, "--max-num-sequence", "0"], "--max-num-sequence must be at least 1, got 0"),
        ([*SERVE, "--prefill-chunk-size", "0"], "--prefill-chunk-size must be at least 1, got 0"),
        ([*SERVE, "--max-queue", "-1"], "--max-queue must be at least 0, got -1"),
        ([*SERVE, "--threads", "0"], "--threads must be at least 1, got 0"),
        ([*BENCH, "--prompt-len", "0"], "--prompt-len must be at least 1, got 0"),
        ([*BENCH, "--gen-len", "-3"], "--gen-len must be at least 1, got -3"),
        ([*BENCH, "--batch", "0"], "--batch must be at least 1, got 0"),
        ([*BENCH, "--runs", "0"], "--runs must be at least 1, got 0"),
        (
            ["convert-weight", "hf", "-q", "q0f32", "-o", "out", "--threads", "0"],
            "--threads must be at least 1, got 0",
        ),
        (
            ["gen-config", "hf", "-q", "q0f32", "-o", "out", "--prefill-chunk-size", "0"],
            "--prefill-chunk-size must be at least 1, got 0",
        ),
        (
            ["gen-config", "hf", "-q", "q0f32", "-o", "out", "--context-window-size", "0"],
            "--context-window-size must be at least 1, got 0",
        ),
        (
            ["compile", "model", "-o", "lib.so", "--max-batch-size", "0"],
            "--max-batch-size must be at least 1, got 0",
        ),
        (
            ["compile", "model", "-o", "lib.so", "--context-window-size", "-1"],
            "--context-window-size must be at least 1, got -1",
        ),
        # click's own usage errors: the same one line, with where to look
        (
            [*GENERATE, "--temperature", "hot"],
            "Invalid value for '--temperature': 'hot' is not a valid float; see `megrez-mlc generate --help`",
        ),
        (
            [*SERVE, "--port", "http"],
            "Invalid value for '--port': 'http' is not a valid integer; see `megrez-mlc serve --help`",
        ),
        ([*GENERATE, "--bogus"], "No such option '--bogus'; see `megrez-mlc generate --help`"),
        (["generate"], "Missing argument 'MODEL'; see `megrez-mlc generate --help`"),
        (["nope"], "No such command 'nope'; see `megrez-mlc --help`"),
    ],
)
def test_option_values_are_checked_up_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], line: str
) -> None:
    """In-process (the parse is all that runs), which keeps these cases quick."""
    monkeypatch.chdir(tmp_path)
    # the CLI points the megrez_mlc logger at its own stderr handler; later tests' caplog needs it back
    logger = logging.getLogger("megrez_mlc")
    monkeypatch.setattr(logger, "handlers", list(logger.handlers))  # the CLI replaces the list's contents
    monkeypatch.setattr(logger, "propagate", logger.propagate)
    monkeypatch.setattr(logger, "level", logger.level)
    result = CliRunner().invoke(main, args)
    assert (result.exit_code, result.stdout, result.stderr) == (1, "", f"error: {line}\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"temperature": math.nan}, "temperature must be a finite number >= 0 (0 = greedy), got nan"),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
        ({"top_k": -2}, "top_k must be an integer >= 0 (0 = no top-k cut), got -2"),
        ({"repetition_penalty": -1.0}, "repetition_penalty must be a finite number > 0 (1 = none), got -1.0"),
        ({"seed": -1}, "seed must be an integer >= 0, got -1"),
        ({"max_tokens": 0}, "max_tokens must be an integer >= 1, got 0"),
        ({"temperature": "0.5"}, "temperature must be a finite number >= 0 (0 = greedy), got '0.5'"),
    ],
)
def test_sampling_params_are_checked_in_the_python_api(settings: dict, message: str) -> None:
    with pytest.raises(MegrezError) as caught:
        SamplingParams(**settings)
    assert str(caught.value) == message


def test_prefill_chunk_larger_than_the_context_window(built, tiny_hf: Path, tmp_path: Path) -> None:
    line = (
        "--prefill-chunk-size 100000 is larger than the context window (512 tokens); use at most 512 or a "
        "larger --context-window-size"
    )
    out = tmp_path / "out"
    assert_clean_failure(
        ["gen-config", str(tiny_hf), "-q", "q0f32", "-o", str(out), "--prefill-chunk-size", "100000"],
        line,
        out,
    )
    model = built("q4f32_1")
    lib = tmp_path / "lib.so"
    assert_clean_failure(
        ["compile", str(model.model_dir), "-o", str(lib), "--prefill-chunk-size", "100000"], line, lib
    )
    assert_clean_failure(
        [
            "compile",
            str(model.model_dir),
            "-o",
            str(lib),
            "--context-window-size",
            "64",
            "--prefill-chunk-size",
            "65",
        ],
        "--prefill-chunk-size 65 is larger than the context window (64 tokens)",
        lib,
    )


def test_engine_settings_beyond_the_library(built) -> None:
    model = built("q4f32_1")
    with pytest.raises(MegrezError) as caught:
        Engine(model.model_dir, model.lib, prefill_chunk_size=513)
    assert str(caught.value) == (
        f"a prefill chunk of 513 tokens does not fit {model.lib}, compiled for chunks of 1 to 512; use at "
        "most 512 or compile with a larger --prefill-chunk-size"
    )
    with pytest.raises(MegrezError, match=r"^the KV cache must hold at least 1 token, not 0$"):
        Engine(model.model_dir, model.lib, max_total_seq_len=0)
    with pytest.raises(MegrezError, match=r"compiled for 1 to 32 sequences at once, not 0; use at most 32"):
        Engine(model.model_dir, model.lib, max_batch_size=0)


# --- -o paths that cannot be written: refused before any work -----------------------------------------------


def as_a_user() -> None:
    """Run a child started by root with folder permissions applying to it, as they do to any user: without
    CAP_DAC_OVERRIDE (dropped from the bounding set, so the exec'd process never gets it)."""
    pr_capbset_drop, cap_dac_override = 24, 1
    if ctypes.CDLL(None, use_errno=True).prctl(pr_capbset_drop, cap_dac_override, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


@pytest.fixture
def read_only_dir(tmp_path: Path):
    if os.geteuid() == 0 and not sys.platform.startswith("linux"):
        pytest.skip("root ignores folder permissions and only Linux lets this test drop that")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


def package_config(tmp_path: Path, model_dir: Path) -> Path:
    path = tmp_path / "mlc-package-config.json"
    path.write_text(
        json.dumps(
            {
                "device": "android",
                "model_list": [{"model": str(model_dir), "model_id": "m", "bundle_weight": True}],
            }
        )
    )
    return path


@pytest.mark.parametrize("verb", ["convert-weight", "gen-config", "compile", "package"])
def test_read_only_output(
    verb: str, built, gpu_model, tiny_hf: Path, tmp_path: Path, read_only_dir: Path
) -> None:
    out = read_only_dir / ("lib.so" if verb == "compile" else "out")
    args = {
        "convert-weight": ["convert-weight", str(tiny_hf), "-q", "q0f32", "-o", str(out)],
        "gen-config": ["gen-config", str(tiny_hf), "-q", "q0f32", "-o", str(out)],
        "compile": ["compile", str(built("q4f32_1").model_dir), "-o", str(out)],
        # before compiling (which would log a line): one line only
        "package": [
            "package",
            "--package-config",
            str(package_config(tmp_path, gpu_model("q4f16_1"))),
            "-o",
            str(out),
        ],
    }[verb]
    proc = subprocess.run(
        [sys.executable, "-m", "megrez_mlc", *args],
        capture_output=True,
        text=True,
        preexec_fn=as_a_user if os.geteuid() == 0 else None,
    )
    line = f"cannot write output {out}: {read_only_dir} is read-only for this user; choose another -o path"
    assert (proc.returncode, proc.stderr) == (1, f"error: {line}\n")
    assert list(read_only_dir.iterdir()) == []


def test_output_paths_of_the_wrong_kind(built, gpu_model, tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    a_folder = tmp_path / "folder.so"
    a_folder.mkdir()
    model = built("q4f32_1")
    config = package_config(tmp_path, gpu_model("q4f16_1"))
    for args, message in [
        (
            ["package", "--package-config", str(config), "-o", str(a_file)],
            f"output {a_file} exists and is not a folder",
        ),
        (
            ["gen-config", str(model.hf_dir), "-q", "q0f32", "-o", str(a_file)],
            f"output {a_file} exists and is not a folder",
        ),
        (
            ["compile", str(model.model_dir), "-o", str(a_file / "lib.so")],
            f"output {a_file / 'lib.so'} is under {a_file}, which is a file",
        ),
        (["compile", str(model.model_dir), "-o", str(a_folder)], f"output {a_folder} exists and is a folder"),
    ]:
        assert_clean_failure(args, message)
    assert a_file.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "folder.so", "mlc-package-config.json"]
    assert list(a_folder.iterdir()) == []


# --- text that is not UTF-8 ---------------------------------------------------------------------------------


def test_prompt_argument_that_is_not_utf8(built) -> None:
    model = built("q4f32_1")
    # "\udcff" is how Python hands on the argument byte 0xff; subprocess turns it back into that byte.
    assert_clean_failure(
        ["generate", str(model.model_dir), "--model-lib", str(model.lib), "--prompt", "ok \udcff"],
        "--prompt is not valid UTF-8 (byte 0xff at character 3); give it as UTF-8 text (check the encoding "
        "of your terminal or file)",
    )


def test_chat_line_that_is_not_utf8_is_refused_and_the_chat_goes_on(built) -> None:
    """A piped line that is not UTF-8 gets an error line; the conversation goes on as if it was never sent."""
    model = built("q4f32_1")

    def chat(stdin: bytes) -> subprocess.CompletedProcess:
        args = [
            "chat",
            str(model.model_dir),
            "--model-lib",
            str(model.lib),
            "--temperature",
            "0",
            "--max-tokens",
            "6",
        ]
        return subprocess.run([sys.executable, "-m", "megrez_mlc", *args], input=stdin, capture_output=True)

    clean = chat(b"hello\nhow are you\n")
    with_bad_line = chat(b"hello\n\xff\xfe bad\nhow are you\n")
    assert clean.returncode == with_bad_line.returncode == 0, with_bad_line.stderr
    error = (
        b"error: the user message is not valid UTF-8 (byte 0xff at character 0); give it as UTF-8 text "
        b"(check the encoding of your terminal or file)\n"
    )
    first_answer_end = len(with_bad_line.stdout.split(error)[0])
    assert with_bad_line.stdout.count(error) == 1
    assert with_bad_line.stdout.replace(error, b"") == clean.stdout
    assert clean.stdout[:first_answer_end] == with_bad_line.stdout[:first_answer_end]


# --- serve: a port or host it cannot listen on --------------------------------------------------------------


def test_serve_on_a_busy_port_or_unknown_host() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The port is bound before the model is read, so a model that does not exist is never reached.
        assert_clean_failure(
            [*SERVE, "--port", str(port)],
            f"port {port} on 127.0.0.1 is already in use (another server?); stop it or choose another --port",
        )
    assert_clean_failure(
        [*SERVE, "--host", "no-such-host.invalid"],
        "cannot serve on --host no-such-host.invalid: ",
    )


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--cpu-kernels", "fast"], "--cpu-kernels fast: choose one of int8, exact"),
        (["--cpu", "pentium9"], "--cpu pentium9: LLVM knows no such CPU"),
        (["--kv-cache-dtype", "bfloat16"], "--kv-cache-dtype bfloat16: choose one of float16, float32"),
        (
            ["--kv-cache-dtype", "float16", "--target", "cuda"],
            "--kv-cache-dtype float16 is for CPU targets; a GPU library keeps its KV cache in the model's "
            "float type (float32 for q4f32_1): leave the option out",
        ),
    ],
)
def test_bad_cpu_kernel_options(built, tmp_path: Path, option: list[str], message: str) -> None:
    out = tmp_path / "lib.so"
    assert_clean_failure(["compile", str(built("q4f32_1").model_dir), "-o", str(out), *option], message, out)
