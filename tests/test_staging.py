"""Nothing lost or half-written: a failed or interrupted conversion leaves the output as it was, and files
megrez-mlc did not write are never deleted. Plus the progress bar: on a terminal only."""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

import megrez_mlc.quantize.convert as convert_module
import megrez_mlc.staging as staging_module
from megrez_mlc.artifacts.tensor_cache import TensorCacheWriter, read_index
from megrez_mlc.errors import MegrezError
from megrez_mlc.quantize.convert import convert_weight
from megrez_mlc.quantize.gen_config import gen_config

from .conftest import run_cli


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def assert_no_staging_leftovers(target: Path) -> None:
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}")] == []


def fail_after(count: int, exception: BaseException, func):
    calls = {"n": 0}

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > count:
            raise exception
        return func(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("previous", [False, True], ids=["fresh", "over-previous-output"])
@pytest.mark.parametrize("where", ["quantize-raises", "ctrl-c-while-writing"])
def test_interrupted_conversion_leaves_the_output_as_it_was(
    tiny_hf: Path, tmp_path: Path, monkeypatch, previous: bool, where: str
) -> None:
    out = tmp_path / "out"
    if previous:
        convert_weight(tiny_hf, out, "q4f32_1")
        gen_config(tiny_hf, out, "q4f32_1")
        before = snapshot(out)
    if where == "quantize-raises":  # in a converter thread, after 5 blocks
        patched = fail_after(5, RuntimeError("simulated failure"), convert_module.quantize_int4)
        monkeypatch.setattr(convert_module, "quantize_int4", patched)
        expected: type[BaseException] = RuntimeError
    else:  # Ctrl-C reaches the main thread while it writes the 8th tensor
        patched = fail_after(7, KeyboardInterrupt(), TensorCacheWriter.write)
        monkeypatch.setattr(TensorCacheWriter, "write", patched)
        expected = KeyboardInterrupt
    with pytest.raises(expected):
        convert_weight(tiny_hf, out, "q4f32_1")
    if previous:
        assert snapshot(out) == before
    else:
        assert not out.exists()
    assert_no_staging_leftovers(out)


def test_ctrl_c_in_the_cli_leaves_nothing(tiny_hf: Path, tmp_path: Path) -> None:
    """A real SIGINT to `megrez-mlc convert-weight` once it is converting (each block is slowed down)."""
    out, started = tmp_path / "out", tmp_path / "started"
    script = (
        "import sys, time, pathlib\n"
        "import megrez_mlc.quantize.convert as c\n"
        "from megrez_mlc.cli import main\n"
        "quantize = c.quantize_int4\n"
        "def slow(*args):\n"
        f"    pathlib.Path({str(started)!r}).touch()\n"
        "    time.sleep(0.2)\n"
        "    return quantize(*args)\n"
        "c.quantize_int4 = slow\n"
        "main()\n"
    )
    args = ["convert-weight", str(tiny_hf), "-q", "q4f32_1", "-o", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert (proc.returncode, stdout, stderr) == (130, "", "interrupted\n")
    assert not out.exists()
    assert_no_staging_leftovers(out)


def test_full_disk_is_one_clear_error(tiny_hf: Path, tmp_path: Path, monkeypatch) -> None:
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(TensorCacheWriter, "write", fail_after(3, full, TensorCacheWriter.write))
    out = tmp_path / "out"
    with pytest.raises(MegrezError) as err:
        convert_weight(tiny_hf, out, "q0f32")
    assert str(err.value) == f"cannot write the converted weights to {out}: No space left on device"
    assert not out.exists()
    assert_no_staging_leftovers(out)


def test_cut_short_while_moving_files_in_leaves_no_index(tiny_hf: Path, tmp_path: Path, monkeypatch) -> None:
    """The old index goes first and the new one comes last: a folder never points at a mix of shards."""
    out = tmp_path / "out"
    convert_weight(tiny_hf, out, "q0f32")
    monkeypatch.setattr(staging_module.os, "replace", fail_after(1, KeyboardInterrupt(), os.replace))
    with pytest.raises(KeyboardInterrupt):
        convert_weight(tiny_hf, out, "q0f32")
    assert not (out / "tensor-cache.json").exists()
    with pytest.raises(MegrezError, match=r"tensor-cache\.json not found; convert the weights first"):
        read_index(out)
    assert_no_staging_leftovers(out)


def test_stale_shards_of_a_larger_conversion_go_but_nothing_else(
    tiny_hf: Path, tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "out"
    with monkeypatch.context() as m:  # tiny shards: the first conversion writes many
        m.setattr(convert_module, "TensorCacheWriter", functools.partial(TensorCacheWriter, shard_limit=4096))
        convert_weight(tiny_hf, out, "q4f32_1")
    many = len(read_index(out)["records"])
    (out / "params_shard_99.bin").write_bytes(b"not listed by the index, so not ours to delete")
    convert_weight(tiny_hf, out, "q4f32_1")
    assert many > 5 and len(read_index(out)["records"]) == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "params_shard_0.bin",
        "params_shard_99.bin",
        "tensor-cache.json",
    ]


def test_force_into_a_foreign_folder_deletes_nothing(tiny_hf: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(convert_module, "TensorCacheWriter", functools.partial(TensorCacheWriter, shard_limit=4096))
        convert_weight(tiny_hf, out, "q4f32_1")
    shards = sorted(p.name for p in out.glob("params_shard_*.bin"))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(MegrezError, match=r"already holds files megrez-mlc did not write \(notes\.txt\)"):
        convert_weight(tiny_hf, out, "q4f32_1")
    convert_weight(tiny_hf, out, "q4f32_1", force=True)
    # Not a folder of ours alone: the old index's extra shards are left (harmless, never loaded), not deleted.
    assert sorted(p.name for p in out.glob("params_shard_*.bin")) == shards
    assert (out / "notes.txt").read_text() == "mine" and len(read_index(out)["records"]) == 1


def test_staging_folders_of_killed_runs_are_cleared(tiny_hf: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead = tmp_path / f".out.partial-{int(finished.stdout)}"
    alive = tmp_path / f".out.partial-{os.getppid()}"  # another process still running: not ours to clear
    for folder in (dead, alive):
        folder.mkdir()
        (folder / "params_shard_0.bin").write_bytes(b"half")
    convert_weight(tiny_hf, out, "q0f32")
    assert not dead.exists() and (alive / "params_shard_0.bin").read_bytes() == b"half"


@pytest.mark.parametrize("verb", ["convert-weight", "gen-config"])
def test_a_previous_output_of_another_quantization_is_kept(tiny_hf: Path, tmp_path: Path, verb: str) -> None:
    out = tmp_path / "out"
    convert_weight(tiny_hf, out, "q4f32_1")
    gen_config(tiny_hf, out, "q4f32_1")
    before = snapshot(out)
    proc = run_cli(verb, str(tiny_hf), "-q", "q0f16", "-o", str(out), check=False)
    assert proc.returncode == 1 and proc.stderr.strip() == (
        f"error: output {out} holds a q4f32_1 model (tensor-cache.json); writing q0f16 there would mix two "
        "formats: choose another -o folder or pass --force"
    )
    assert snapshot(out) == before
    run_cli(verb, str(tiny_hf), "-q", "q4f32_1", "-o", str(out))  # the same conversion again is fine
    run_cli(verb, str(tiny_hf), "-q", "q0f16", "-o", str(out), "--force")


def run_on_a_terminal(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run megrez-mlc with stderr on a pseudo-terminal (as in a shell); returns (exit code, its stderr)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # a 160-column window
    proc = subprocess.Popen(
        [sys.executable, "-m", "megrez_mlc", *args], stdout=subprocess.DEVNULL, stderr=follower, env=env
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return proc.wait(), b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize("ci", [False, True])
def test_progress_bar_on_a_terminal_only(tiny_hf: Path, tmp_path: Path, ci: bool) -> None:
    env = (
        {k: v for k, v in os.environ.items() if k != "CI"}
        | {"TERM": "xterm"}
        | ({"CI": "true"} if ci else {})
    )
    code, shown = run_on_a_terminal(
        ["convert-weight", str(tiny_hf), "-q", "q4f32_1", "-o", str(tmp_path / "a")], env
    )
    assert code == 0
    total = sum(s["nbytes"] for s in read_index(tmp_path / "a")["records"]) / 2**20
    if ci:
        assert shown == ""
    else:
        final = shown.replace("\r", "\n").strip().splitlines()[-1]
        assert final.startswith("convert: 100%") and " 15/15 " in final
        assert final.endswith(f"{total:.1f}/{total:.1f} MiB written]")
    piped = run_cli("convert-weight", str(tiny_hf), "-q", "q4f32_1", "-o", str(tmp_path / "b"))
    assert piped.stderr == ""


def test_an_unreadable_previous_index_is_not_overwritten(tiny_hf: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "tensor-cache.json").write_text("{not json")
    with pytest.raises(MegrezError) as err:
        convert_weight(tiny_hf, out, "q0f32")
    assert str(err.value) == (
        f"output {out} holds an unrecognised model (tensor-cache.json); writing q0f32 there would mix two "
        "formats: choose another -o folder or pass --force"
    )
    convert_weight(tiny_hf, out, "q0f32", force=True)
    assert read_index(out)["records"][0]["dataPath"] == "params_shard_0.bin"
