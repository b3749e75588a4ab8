"""`megrez-mlc chat`: an interactive conversation in the terminal, over a `ChatSession`.

Input goes through prompt_toolkit (line editing, history kept in $MEGREZ_MLC_HOME/chat-history, multi-line
messages) when stdin is a terminal, and is read line by line otherwise (`echo hi | megrez-mlc chat ...`).
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from .errors import MegrezError
from .home import megrez_home
from .omni.audio import read_audio_file
from .omni.images import read_image_file
from .runtime.chat import ChatSession

PROMPT = ">>> "
CONTINUATION = "... "
HELP = """\
/help                  this help
/stats                 the last answer: prefill and decode tokens and speed; context used
/set KEY=VALUE;...     sampling settings, e.g. /set temperature=0.5;top_p=0.9
                       (temperature, top_p, top_k, max_tokens, repetition_penalty, seed)
/system TEXT           set the system prompt (without TEXT: show it)
/image PATH [TEXT]     attach an image to the next message (Omni models); with TEXT, send it at once
                       (quote a PATH with spaces: /image "my photo.jpg" What is this?)
/audio PATH [TEXT]     send an audio file (a spoken message; Omni models) at once, with the attached
                       images and TEXT (e.g. /audio clip.wav 将语音转化为文字。 transcribes it)
/reset                 start a new conversation
/exit                  quit (or Ctrl-D)
Enter sends. End a line with \\ (or press Esc then Enter) to write more lines.
Ctrl-C stops an answer; what it wrote so far stays in the conversation."""
SETTABLE = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "max_tokens": int,
    "repetition_penalty": float,
    "seed": int,
}


def parse_settings(text: str) -> dict[str, float | int]:
    """`temperature=0.5;top_p=0.9` -> {"temperature": 0.5, "top_p": 0.9}."""
    settings: dict[str, float | int] = {}
    for item in (part.strip() for part in text.split(";")):
        if not item:
            continue
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or key not in SETTABLE:
            raise MegrezError(f"cannot set {item!r}: use KEY=VALUE with KEY one of {', '.join(SETTABLE)}")
        try:
            settings[key] = SETTABLE[key](value)
        except ValueError:
            raise MegrezError(f"{key} needs a number ({SETTABLE[key].__name__}), got {value!r}") from None
    if not settings:
        raise MegrezError("nothing to set: e.g. /set temperature=0.5;top_p=0.9")
    return settings


def describe_settings(session: ChatSession) -> str:
    p = session.params
    return ", ".join(f"{key}={getattr(p, key)}" for key in SETTABLE)


def terminal_reader() -> Callable[[], str]:
    """One message per call from prompt_toolkit; KeyboardInterrupt on Ctrl-C, EOFError on Ctrl-D."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    bindings = KeyBindings()

    @bindings.add("enter")
    def _send_or_continue(event) -> None:
        buffer = event.current_buffer
        if buffer.document.is_cursor_at_the_end and buffer.text.endswith("\\"):
            buffer.delete_before_cursor(1)
            buffer.insert_text("\n")
        else:
            buffer.validate_and_handle()

    @bindings.add("escape", "enter")
    def _new_line(event) -> None:
        event.current_buffer.insert_text("\n")

    try:
        megrez_home().mkdir(parents=True, exist_ok=True)
        history = FileHistory(str(megrez_home() / "chat-history"))
    except OSError:
        history = InMemoryHistory()
    session = PromptSession(
        history=history,
        multiline=True,  # Enter is bound above; multiline lets the buffer hold and show several lines
        key_bindings=bindings,
        prompt_continuation=CONTINUATION,
    )
    return lambda: session.prompt(PROMPT)


def stream_reader(stream: TextIO) -> Callable[[], str]:
    """Messages from a pipe: one per line, a trailing backslash joins the next line."""

    def read() -> str:
        lines = []
        while True:
            line = stream.readline()
            if not line:
                if lines:
                    return "\n".join(lines)
                raise EOFError
            line = line.rstrip("\n")
            if not line.endswith("\\"):
                return "\n".join([*lines, line])
            lines.append(line[:-1])

    return read


class ChatRepl:
    def __init__(self, session: ChatSession, read: Callable[[], str], out: TextIO) -> None:
        self.session = session
        self.read = read
        self.out = out
        self.images: list[Path] = []  # attached with /image, sent with the next message

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def run(self) -> None:
        while True:
            try:
                text = self.read()
            except KeyboardInterrupt:  # Ctrl-C at the prompt drops the line, as in Python's REPL
                continue
            except EOFError:  # Ctrl-D
                self.say()
                return
            if not text.strip():
                continue
            try:
                if text.lstrip().startswith("/"):
                    if not self.command(text.strip()):
                        return
                else:
                    self.answer(text)
            except MegrezError as err:
                self.say(f"error: {err}")

    def answer(self, text: str, audios: tuple[Path, ...] = ()) -> None:
        from .runtime.media import content_with_media

        images, self.images = self.images, []
        deltas = self.session.send(content_with_media(text, images, list(audios)))
        try:
            for delta in deltas:
                self.out.write(delta)
                self.out.flush()
        except KeyboardInterrupt:
            deltas.close()  # the session keeps the partial answer and repairs its KV cache
            self.say()
            self.say("[stopped]")
            return
        except MegrezError:
            self.say()
            raise
        self.say()

    def command(self, line: str) -> bool:
        """Run a /command; False when the REPL should end."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        session = self.session
        if name == "/exit":
            return False
        if name == "/help":
            self.say(HELP)
        elif name == "/stats":
            if session.finish_reason is None:
                self.say("no answer yet")
            else:
                window = session.engine.context_window_size
                self.say(f"{session.stats}; context: {len(session.token_ids())} of {window} tok")
        elif name == "/set":
            session.set_sampling(**parse_settings(arg))
            self.say(describe_settings(session))
        elif name == "/system":
            if arg:
                session.system = arg
                self.say("system prompt set")
            else:
                self.say(session.system)
        elif name == "/reset":
            session.reset()
            self.images = []
            self.say("new conversation")
        elif name in ("/image", "/audio"):
            self.media_command(name, arg)
        else:
            self.say(f"unknown command {name}; /help lists the commands")
        return True

    def media_command(self, name: str, arg: str) -> None:
        """`/image PATH [TEXT]`: check and keep the image for the next message; send TEXT with it now.
        `/audio PATH [TEXT]`: send the clip now (it is the message, or part of it)."""
        try:
            words = shlex.split(arg)
        except ValueError as err:
            raise MegrezError(f"{name} {arg}: {err}") from None
        if not words:
            if name == "/audio":
                raise MegrezError("/audio needs a PATH, e.g. /audio question.wav")
            listed = ", ".join(map(str, self.images)) or "none"
            self.say(f"images for the next message: {listed}")
            return
        engine, path, text = self.session.engine, Path(words[0]).expanduser(), " ".join(words[1:])
        if name == "/audio":
            if engine.audio_encoder is None:
                raise MegrezError("this model does not hear audio (use a Megrez-3B-Omni model)")
            read_audio_file(path)  # a missing or broken file is reported before anything is sent
            self.answer(text, (path,))
            return
        if engine.image_encoder is None:
            raise MegrezError("this model does not read images (use a Megrez-3B-Omni model)")
        read_image_file(path)  # a missing or broken file is reported now, not with the next message
        self.images.append(path)
        if text:
            self.answer(text)
        else:
            self.say(f"image {path} attached; now type your message")


def run_chat(
    model: str,
    *,
    model_lib: str | None = None,
    device: str = "cpu",
    quantization: str | None = None,
    system: str | None = None,
    **sampling: float | int | None,
) -> None:
    """Prepare MODEL (building what is missing), load it and talk until /exit or Ctrl-D."""
    from pathlib import Path

    from .model_source import prepare_model
    from .runtime import Engine

    prepared = prepare_model(
        model, model_lib=Path(model_lib) if model_lib else None, device=device, quantization=quantization
    )
    engine = Engine(prepared.model_dir, prepared.model_lib, device, max_batch_size=1)
    session = ChatSession(engine, system=system, **sampling)
    interactive = sys.stdin.isatty()
    if not interactive:
        # A line that is not UTF-8 must not end the conversation: read its bytes as surrogates, so the
        # tokenizer refuses that one message (an error line) and the next line is read as usual.
        sys.stdin.reconfigure(errors="surrogateescape")
    read = terminal_reader() if interactive else stream_reader(sys.stdin)
    repl = ChatRepl(session, read, sys.stdout)
    if interactive:
        quantized = engine.chat_config.quantization
        repl.say(
            f"{prepared.model_dir.name} ({quantized}) on {device}, context {engine.context_window_size} "
            "tokens. /help for commands, Ctrl-D to quit."
        )
    with session:
        repl.run()
