"""`megrez-mlc chat`: MODEL resolution and on-the-fly builds; the REPL driven in a real pseudo-terminal."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pexpect
import pytest

from megrez_mlc.errors import MegrezError
from megrez_mlc.model_source import PreparedModel, converted_model, default_quantization, prepare_model
from megrez_mlc.runtime import ChatSession, Engine

# The CLI's settings for the turns below: greedy, short answers (the model's repetition penalty applies).
CLI_SAMPLING = {"temperature": 0.0, "max_tokens": 8}
# A stand-in for a big model on a slow machine: every decode step takes 50 ms, so Ctrl-C lands mid-answer.
SLOW_CHAT = """\
import time
from megrez_mlc.runtime.model_lib import ModelLibrary
decode = ModelLibrary.decode
def slow_decode(self, *args):
    time.sleep(0.05)
    return decode(self, *args)
ModelLibrary.decode = slow_decode
from megrez_mlc.cli import main
main(prog_name="megrez-mlc")
"""


@pytest.fixture(scope="module")
def chat_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("megrez-home")


@pytest.fixture(scope="module")
def prepared(tiny_hf: Path, chat_home: Path) -> PreparedModel:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MEGREZ_MLC_HOME", str(chat_home))
        return prepare_model(str(tiny_hf))


@pytest.fixture(scope="module")
def engine(prepared: PreparedModel) -> Engine:
    return Engine(prepared.model_dir, prepared.model_lib, max_batch_size=1)


def child_env(chat_home: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "MEGREZ_MLC_HOME": str(chat_home), "LANG": "C.UTF-8", **extra}


def test_default_quantization_follows_the_device() -> None:
    assert default_quantization("cpu") == "q4f32_1"
    assert default_quantization("cuda:0") == "q4f16_1"
    assert default_quantization("metal") == "q4f16_1"


def test_raw_checkpoint_is_built_once_into_the_home(
    tiny_hf: Path, chat_home: Path, prepared: PreparedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert prepared.model_dir.parent == chat_home / "models"
    assert prepared.model_dir.name.startswith("tiny-megrez-q4f32_1-")  # CPU default
    assert prepared.model_lib.parent == chat_home / "libs" and prepared.model_lib.suffix == ".so"
    chat_config = json.loads((prepared.model_dir / "mlc-chat-config.json").read_text())
    assert chat_config["quantization"] == "q4f32_1"
    assert not list(chat_home.glob("*/.*partial*"))

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("rebuilt although the cache holds the result")

    monkeypatch.setenv("MEGREZ_MLC_HOME", str(chat_home))
    monkeypatch.setattr("megrez_mlc.quantize.convert.convert_weight", must_not_run)
    monkeypatch.setattr("megrez_mlc.compile.compiler.compile_model", must_not_run)
    again = prepare_model(str(tiny_hf))
    assert again == prepared
    # the converted folder itself finds the same library (keyed by its chat config and target)
    assert prepare_model(str(prepared.model_dir)) == prepared
    assert prepare_model(str(prepared.model_dir / "mlc-chat-config.json")) == prepared
    with pytest.raises(MegrezError, match="already converted to q4f32_1"):
        prepare_model(str(prepared.model_dir), quantization="q0f32")


def test_a_changed_compiler_compiles_the_library_again(
    tiny_hf: Path, chat_home: Path, prepared: PreparedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cached library's key holds a hash of the compiler's source: a checkout whose kernels changed, at
    the same version, does not run a library compiled before."""
    compiled: list[Path] = []

    def record(model: Path, target: str, lib: Path, **options: object) -> SimpleNamespace:
        compiled.append(lib)
        return SimpleNamespace(seconds=0.0)

    monkeypatch.setenv("MEGREZ_MLC_HOME", str(chat_home))
    monkeypatch.setattr("megrez_mlc.model_source._compiler_digest", lambda: "another compiler")
    monkeypatch.setattr("megrez_mlc.compile.compiler.compile_model", record)
    again = prepare_model(str(tiny_hf))
    assert compiled == [again.model_lib] and again.model_lib != prepared.model_lib
    assert again.model_dir == prepared.model_dir  # the weights are not converted again


def test_cache_key_follows_checkpoint_and_quantization(
    tiny_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEGREZ_MLC_HOME", str(tmp_path / "home"))
    hf = shutil.copytree(tiny_hf, tmp_path / "tiny-megrez")
    first = converted_model(hf, "q4f32_1")
    assert converted_model(hf, "q4f32_1") == first
    assert converted_model(hf, "q0f32") != first
    config = hf / "config.json"
    config.write_text(config.read_text() + "\n")  # an edited checkpoint is converted again
    assert converted_model(hf, "q4f32_1") != first


def test_not_a_model(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "megrez_mlc", "chat", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "is not a model: pass a folder made by `megrez-mlc gen-config`" in proc.stderr


@pytest.mark.parametrize(
    "hub_env",
    [{"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}],
    ids=["offline", "unreachable"],
)
def test_hf_model_without_network_is_one_clear_line(tmp_path: Path, hub_env: dict[str, str]) -> None:
    cache = tmp_path / "hf-cache"  # empty: nothing to fall back on
    env = child_env(tmp_path / "home", HF_HOME=str(cache), HF_HUB_CACHE=str(cache / "hub"), **hub_env)
    proc = subprocess.run(
        [sys.executable, "-m", "megrez_mlc", "chat", "HF://Infinigence/Megrez-3B-Instruct"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(
        "error: cannot download Infinigence/Megrez-3B-Instruct from the Hugging Face Hub ("
    )
    assert lines[0].endswith("download the checkpoint yourself and pass its folder")
    assert not (tmp_path / "home" / "models").exists()


def test_piped_input(tiny_hf: Path, chat_home: Path, engine: Engine) -> None:
    with ChatSession(engine, **CLI_SAMPLING) as reference:
        answers = [reference.ask("hello"), reference.ask("line one\nline two")]
        stats = reference.stats
    proc = subprocess.run(
        [sys.executable, "-m", "megrez_mlc", "chat", str(tiny_hf), "--temperature", "0", "--max-tokens", "8"],
        input=b"hello\nline one\\\nline two\n/stats\n",
        capture_output=True,
        env=child_env(chat_home),
        check=True,
    )
    out = proc.stdout.decode()  # bytes: the answers hold raw \r that text mode would turn into \n
    assert out.startswith(f"{answers[0]}\n{answers[1]}\n")
    assert f"prefill: {stats.prefill_tokens} tok, " in out
    assert f"decode: {stats.decode_tokens} tok, " in out


STATS = re.compile(
    r"prefill: (\d+) tok, [\d.]+ tok/s; decode: (\d+) tok, [\d.]+ tok/s; context: (\d+) of 512 tok"
)
ENTER, ESCAPE_ENTER, UP = "\r", "\x1b\r", "\x1b[A"


def spawn_chat(tiny_hf: Path, chat_home: Path, *, slow: bool) -> pexpect.spawn:
    """`megrez-mlc chat` in a pseudo-terminal, as a user runs it (prompt_toolkit sees a real terminal)."""
    program = ["-c", SLOW_CHAT] if slow else ["-m", "megrez_mlc"]
    child = pexpect.spawn(
        sys.executable,
        [*program, "chat", str(tiny_hf), "--temperature", "0", "--max-tokens", "8"],
        env=child_env(chat_home, TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1"),
        encoding="utf-8",
        codec_errors="strict",
        timeout=60,
        dimensions=(40, 160),
    )
    child.expect_exact("/help for commands, Ctrl-D to quit.")
    return child


def expect_text(child: pexpect.spawn, text: str) -> None:
    child.expect_exact(text.replace("\n", "\r\n"))  # the terminal turns each \n into \r\n


def expect_stats(child: pexpect.spawn) -> tuple[int, int, int]:
    child.send("/stats" + ENTER)
    child.expect(STATS)
    prefill, decode, context = (int(g) for g in child.match.groups())
    return prefill, decode, context


def test_repl_in_a_pseudo_terminal(tiny_hf: Path, chat_home: Path, engine: Engine) -> None:
    tokenizer = engine.tokenizer
    multi_line = "line one\nline two\nline three"
    story, after_story, fresh = "Write a long story about Megrez", "and then?", "你好😀"
    sampled = {"temperature": 0.5, "top_p": 0.9, "seed": 17, "max_tokens": 300}

    reference = ChatSession(engine, **CLI_SAMPLING)
    answer_1, answer_2 = reference.ask("hello"), reference.ask(multi_line)
    stats_2, context_2 = reference.stats, len(reference.token_ids())
    reference.set_sampling(**sampled)
    reference.ask(story)
    story_message = reference.history[-1]
    gp, end = reference.generation_prompt_ids, reference.answer_end_ids
    story_ids = story_message.token_ids[len(gp) : -len(end)]
    assert len(story_ids) >= 60  # long enough (3 s at 50 ms a token) for Ctrl-C to land mid-answer
    story_start = tokenizer.decode(story_ids[:4]).rstrip("\ufffd")
    assert len(story_start) >= 2

    child = spawn_chat(tiny_hf, chat_home, slow=True)
    child.send("/help" + ENTER)
    child.expect_exact("/set KEY=VALUE;...")
    child.send("hello" + ENTER)
    expect_text(child, answer_1)
    child.send("line one\\" + ENTER + "line two" + ESCAPE_ENTER + "line three" + ENTER)
    expect_text(child, answer_2)
    assert expect_stats(child) == (stats_2.prefill_tokens, stats_2.decode_tokens, context_2)

    child.send("/set temperature=0.5;top_p=0.9;seed=17;max_tokens=300" + ENTER)
    expect_text(
        child, "temperature=0.5, top_p=0.9, top_k=0, max_tokens=300, repetition_penalty=1.02, seed=17"
    )
    child.send(story + ENTER)
    expect_text(child, story_start)
    interrupted_at = time.monotonic()
    child.sendintr()  # Ctrl-C
    child.expect_exact("[stopped]")
    assert time.monotonic() - interrupted_at < 2
    # The partial answer stayed in the conversation: its length in tokens follows from the context size.
    _, _, context_3 = expect_stats(child)
    user_ids = tokenizer.encode(reference.conversation.render_message("user", story))
    kept = context_3 - context_2 - len(user_ids) - len(gp) - len(end)
    assert 1 <= kept < len(story_ids)

    # The reference takes the same partial answer; the next turn must then agree token for token.
    partial = story_ids[:kept]
    story_message.content, story_message.token_ids = tokenizer.decode(partial), gp + partial + end
    reference.set_sampling(temperature=0.0, max_tokens=8)
    answer_4 = reference.ask(after_story)
    child.send("/set temperature=0;max_tokens=8" + ENTER)
    child.expect_exact("seed=17")
    child.send(after_story + ENTER)
    expect_text(child, answer_4)
    prefill_4, _, context_4 = expect_stats(child)
    new_tokens = len(end) + len(tokenizer.encode(reference.conversation.render_message("user", after_story)))
    # only the new tokens (and perhaps the last partial token, sampled but not yet fed back)
    assert prefill_4 - new_tokens - len(gp) in (0, 1)
    assert context_4 == len(reference.token_ids())

    child.send("/reset" + ENTER)
    child.expect_exact("new conversation")
    reference.reset()
    answer_5 = reference.ask(fresh)
    child.send(fresh + ENTER)
    expect_text(child, answer_5)
    prefill_5, _, _ = expect_stats(child)
    assert (
        prefill_5 == reference.stats.prefill_tokens < len(reference.token_ids()) // 2
    )  # system prompt reused
    child.send("/exit" + ENTER)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    reference.close()

    # A second start: the history recalls earlier messages (Up), Ctrl-C at the prompt drops a line,
    # Ctrl-D exits.
    with ChatSession(engine, **CLI_SAMPLING) as again:
        answer_fresh = again.ask(fresh)
    child = spawn_chat(tiny_hf, chat_home, slow=False)
    child.send(UP + UP + UP)  # /exit, /stats, then the message before them
    child.expect_exact(fresh)
    child.send(ENTER)
    expect_text(child, answer_fresh)
    child.send("never sent")
    child.sendintr()
    child.sendcontrol("d")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "never sent\r\n" not in child.before
