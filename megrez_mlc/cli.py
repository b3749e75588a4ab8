"""`megrez-mlc` command line: each verb parses its options, calls one function, prints the result."""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .artifacts.chat_config import DEFAULT_MAX_BATCH_SIZE
from .artifacts.schemes import SCHEMES
from .errors import MegrezError


def _report_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """A MegrezError becomes one line on stderr and exit status 1; Ctrl-C exits 130 quietly."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except MegrezError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


class _OneLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


class _Cli(click.Group):
    """click's own errors (an unknown option, a value out of range) as one `error:` line and exit status 1,
    like every other error, instead of click's "Usage: ... Error: ..." block and status 2."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        kwargs.setdefault("prog_name", self.name)  # under `python -m megrez_mlc` too: the command users type
        try:
            exit_code = super().main(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError as err:  # plain `megrez-mlc`: the help, as click shows it
            err.show()
            sys.exit(err.exit_code)
        except click.ClickException as err:
            message = " ".join(err.format_message().split())
            # click's own messages ("No such option", "Missing argument") leave the fix to the help.
            ctx = getattr(err, "ctx", None)
            hint = f"; see `{ctx.command_path} --help`" if ctx and not isinstance(err, _BadValue) else ""
            click.echo(f"error: {message.rstrip('.')}{hint}", err=True)
            sys.exit(1)
        except click.Abort:  # Ctrl-C while click itself reads input
            click.echo("interrupted", err=True)
            sys.exit(130)
        # Without standalone mode click returns the code of --help / --version (0) or the verb's None.
        sys.exit(exit_code or 0)


class _BadValue(click.UsageError):
    """An option's value refused with a message that names the option and the values it takes."""


class _IntRange(click.ParamType):
    """An integer from `low` to `high` (no upper limit when None): 0 or a negative count is refused with the
    option named, never taken to mean "the default"."""

    name = "integer"

    def __init__(self, low: int, high: int | None = None) -> None:
        self.low, self.high = low, high

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        number = click.INT.convert(value, param, ctx)
        if number < self.low or (self.high is not None and number > self.high):
            allowed = f"at least {self.low}" if self.high is None else f"from {self.low} to {self.high}"
            raise _BadValue(f"{_option_name(param)} must be {allowed}, got {number}")
        return number


def _option_name(param: click.Parameter | None) -> str:
    return max(param.opts, key=len) if param is not None else "the value"


# Sizes and counts (tokens, sequences, threads, runs): 1 or more.
COUNT = _IntRange(1)
PORT = _IntRange(1, 65535)


def _check_sampling(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """A sampling option against the same ranges as SamplingParams, before anything is loaded."""
    if value is None:
        return value
    from .runtime.sampling import sampling_problem

    problem = sampling_problem(param.name, value)
    if problem:
        raise _BadValue(f"{_option_name(param)} {problem}")
    return value


def _check_prompt(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A prompt the tokenizer can encode (an argument of bytes that are not UTF-8 cannot be)."""
    from .runtime.tokenizer import check_text

    if value is None:
        return value
    try:
        check_text(value, _option_name(param))
    except MegrezError as err:
        raise _BadValue(str(err)) from None
    return value


@click.group("megrez-mlc", cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="megrez-mlc")
def main() -> None:
    """Run Megrez-3B on your own device: convert, compile, generate (MLC-LLM compatible)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter())
    logger = logging.getLogger("megrez_mlc")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


quantization_option = click.option(
    "--quantization", "-q", required=True, help=f"Weight format: {', '.join(SCHEMES)}."
)


@main.command("convert-weight")
@click.argument("hf_dir", type=click.Path(path_type=Path))
@quantization_option
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Output model folder.")
@click.option(
    "--preset", default=None, help="Model preset filling fields config.json lacks (default: guessed)."
)
@click.option(
    "--force",
    is_flag=True,
    help="Write into a folder holding other files (left alone) or a model of another quantization.",
)
@click.option(
    "--threads", type=COUNT, default=None, help="Converter threads (default: one per core, at most 8)."
)
@_report_errors
def convert_weight_cmd(
    hf_dir: Path, quantization: str, output: Path, preset: str | None, force: bool, threads: int | None
) -> None:
    """Convert (and quantize) a Hugging Face checkpoint into MLC's weight format."""
    from .quantize.convert import convert_weight

    start = time.perf_counter()
    result = convert_weight(hf_dir, output, quantization, preset=preset, force=force, threads=threads)
    click.echo(
        f"wrote {result.num_tensors} tensors, {result.param_bytes / 2**20:.1f} MiB "
        f"({result.bits_per_param:.2f} bits/param) to {output} in {time.perf_counter() - start:.1f} s"
    )


@main.command("verify")
@click.argument("model_dir", type=click.Path(path_type=Path))
@_report_errors
def verify_cmd(model_dir: Path) -> None:
    """Check a converted model's shards (size and md5) and tensors (against mlc-chat-config.json)."""
    from .quantize.verify import verify_model

    result = verify_model(model_dir)
    against = (
        f"; all tensors match mlc-chat-config.json ({result.quantization})" if result.quantization else ""
    )
    click.echo(
        f"ok: {result.num_shards} shards, {result.num_bytes / 2**20:.1f} MiB, {result.num_tensors} tensors, "
        f"md5 sums match{against}"
    )


@main.command("gen-config")
@click.argument("hf_dir", type=click.Path(path_type=Path))
@quantization_option
@click.option("--conv-template", default="megrez", show_default=True, help="Conversation template.")
@click.option(
    "--context-window-size", type=COUNT, default=None, help="Longest sequence (default: the model's)."
)
@click.option("--prefill-chunk-size", type=COUNT, default=None, help="Most tokens per prefill call.")
@click.option("--preset", default=None, help="Model preset (default: guessed from the folder name).")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Output model folder.")
@click.option(
    "--force",
    is_flag=True,
    help="Write into a folder holding other files (left alone) or a model of another quantization.",
)
@_report_errors
def gen_config_cmd(
    hf_dir: Path,
    quantization: str,
    conv_template: str,
    context_window_size: int | None,
    prefill_chunk_size: int | None,
    preset: str | None,
    output: Path,
    force: bool,
) -> None:
    """Write mlc-chat-config.json and copy the tokenizer files."""
    from .artifacts.files import CHAT_CONFIG_FILE
    from .quantize.gen_config import gen_config

    config = gen_config(
        hf_dir,
        output,
        quantization,
        conv_template=conv_template,
        context_window_size=context_window_size,
        prefill_chunk_size=prefill_chunk_size,
        preset=preset,
        force=force,
    )
    click.echo(f"wrote {output / CHAT_CONFIG_FILE} and {len(config.tokenizer_files)} tokenizer files")


@main.command("compile")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--target", "-t", default="cpu", show_default=True, help="See `megrez-mlc targets`.")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    required=True,
    help="Library to write: .so/.dylib/.wasm (linked here) or .tar (objects, always possible).",
)
@click.option(
    "--host", default=None, help="LLVM host triple, e.g. aarch64-linux-gnu (default: the target's)."
)
@click.option(
    "--cpu", default=None, help="LLVM CPU of the host, e.g. znver3 or haswell (default: this machine's)."
)
@click.option(
    "--cpu-kernels",
    default="int8",
    show_default=True,
    help="CPU weight kernels: int8 (integer dot products, AVX2/VNNI) or exact (float32).",
)
@click.option(
    "--kv-cache-dtype",
    default=None,
    help="CPU KV cache: float16 or float32 (default: float16 with int8 kernels, else the model's type).",
)
@click.option("--cuda-arch", default=None, help="CUDA architecture, e.g. sm_89 (default: the local GPU's).")
@click.option(
    "--system-lib-prefix",
    default=None,
    help="Symbol prefix of a static (.tar/.wasm) library (default: llama_<quantization>_).",
)
@click.option("--max-batch-size", type=COUNT, default=DEFAULT_MAX_BATCH_SIZE, show_default=True)
@click.option("--context-window-size", type=COUNT, default=None, help="Override the config's context window.")
@click.option("--prefill-chunk-size", type=COUNT, default=None, help="Override the config's prefill chunk.")
@_report_errors
def compile_cmd(
    model: Path,
    target: str,
    output: Path,
    host: str | None,
    cpu: str | None,
    cpu_kernels: str,
    kv_cache_dtype: str | None,
    cuda_arch: str | None,
    system_lib_prefix: str | None,
    max_batch_size: int,
    context_window_size: int | None,
    prefill_chunk_size: int | None,
) -> None:
    """Compile a converted model (folder or mlc-chat-config.json) into a model library."""
    from .compile.compiler import compile_model

    result = compile_model(
        model,
        target,
        output,
        host=host,
        cpu=cpu,
        cpu_kernels=cpu_kernels,
        kv_cache_dtype=kv_cache_dtype,
        cuda_arch=cuda_arch,
        system_lib_prefix=system_lib_prefix,
        max_batch_size=max_batch_size,
        context_window_size=context_window_size,
        prefill_chunk_size=prefill_chunk_size,
    )
    prefix = f" (system library, prefix {result.system_lib_prefix})" if result.system_lib_prefix else ""
    cpu = result.cpu_kernels
    kernels = f", {cpu} kernels, {result.kv_cache_dtype} KV cache" if cpu else ""
    click.echo(f"compiled {output} for {result.target}{prefix}{kernels} in {result.seconds:.1f} s")


@main.command("targets")
@_report_errors
def targets_cmd() -> None:
    """Which targets this machine and TVM build can compile for and run, and why not."""
    from .compile.targets import target_statuses

    rows = [("target", "compile", "run", "-o here", "what it is; why not")]
    for status in target_statuses():
        notes = [status.description]
        notes += [f"cannot compile: {status.cannot_compile}"] if status.cannot_compile else []
        notes += [f"cannot run: {status.cannot_run}"] if status.cannot_run else []
        rows.append(
            (
                status.name,
                "no" if status.cannot_compile else "yes",
                "no" if status.cannot_run else "yes",
                ",".join(status.outputs_here) if not status.cannot_compile else "-",
                "; ".join(notes),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4])


@main.command("package")
@click.option(
    "--package-config",
    type=click.Path(path_type=Path),
    default=Path("mlc-package-config.json"),
    show_default=True,
    help="MLC package config: device and model_list.",
)
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("dist"), show_default=True)
@_report_errors
def package_cmd(package_config: Path, output: Path) -> None:
    """Model libraries + app bundle for MLCChat (Android, iPhone): OUT/lib and OUT/bundle."""
    from .package import package

    result = package(package_config, output)
    for library in result.libraries.values():
        click.echo(f"wrote {library.output}")
    if result.static_archive:
        click.echo(f"wrote {result.static_archive}")
    click.echo(f"wrote {output / 'bundle' / 'mlc-app-config.json'}:")
    for model in result.app_config["model_list"]:
        where = model.get("model_path") or model.get("model_url")
        vram = model["estimated_vram_bytes"]
        click.echo(
            f"  {model['model_id']}: {model['model_lib']}, {where}, "
            f"estimated_vram_bytes {vram} ({vram / 2**30:.2f} GiB)"
        )


def max_tokens_option(default: int, help: str) -> Callable[..., Any]:
    return click.option(
        "--max-tokens", type=int, default=default, show_default=True, callback=_check_sampling, help=help
    )


temperature_option = click.option(
    "--temperature",
    type=float,
    default=None,
    callback=_check_sampling,
    help="0 = greedy (default: the model's).",
)
top_p_option = click.option(
    "--top-p",
    type=float,
    default=None,
    callback=_check_sampling,
    help="Nucleus sampling mass (default: the model's).",
)


def _sampling_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        max_tokens_option(256, "Most tokens to generate."),
        temperature_option,
        top_p_option,
        click.option(
            "--top-k",
            type=int,
            default=0,
            show_default=True,
            callback=_check_sampling,
            help="Sample among the k best; 0 = all.",
        ),
        click.option(
            "--repetition-penalty",
            type=float,
            default=None,
            callback=_check_sampling,
            help="Default: the model's.",
        ),
        click.option(
            "--seed",
            type=int,
            default=None,
            callback=_check_sampling,
            help="Random seed for reproducible sampling.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _model_lib_option(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option(
        "--device", default="cpu", show_default=True, help="cpu, cuda, metal, webgpu, vulkan..."
    )(func)
    return click.option(
        "--model-lib",
        type=click.Path(path_type=Path),
        required=True,
        help="Library from `megrez-mlc compile`.",
    )(func)


@main.command("generate")
@click.argument("model", type=click.Path(path_type=Path))
@_model_lib_option
@click.option(
    "--prompt",
    "-p",
    default=None,
    callback=_check_prompt,
    help="The prompt (a user message unless --raw); optional with --audio (a spoken question).",
)
@click.option("--raw", is_flag=True, help="Tokenize the prompt as is: no chat template, no BOS.")
@click.option(
    "--image",
    "images",
    multiple=True,
    type=click.Path(path_type=Path),
    help="An image the prompt is about (repeatable; Megrez-3B-Omni models): it goes before the prompt.",
)
@click.option(
    "--audio",
    "audios",
    multiple=True,
    type=click.Path(path_type=Path),
    help="An audio file (WAV, FLAC, MP3, M4A, OGG; repeatable; Megrez-3B-Omni models): after the images, "
    "before the prompt.",
)
@_sampling_options
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--ignore-eos", is_flag=True, help="Do not stop at end-of-turn tokens.")
@click.option(
    "--json-schema",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The answer is JSON valid against the JSON schema in this file (constrained decoding).",
)
@click.option("--json", "as_json", is_flag=True, help='Print one JSON line: {"text", "token_ids", "usage"}.')
@_report_errors
def generate_cmd(
    model: Path,
    model_lib: Path,
    device: str,
    prompt: str | None,
    raw: bool,
    images: tuple[Path, ...],
    audios: tuple[Path, ...],
    max_tokens: int,
    temperature: float | None,
    top_p: float | None,
    top_k: int,
    repetition_penalty: float | None,
    seed: int | None,
    stop: tuple[str, ...],
    ignore_eos: bool,
    json_schema: Path | None,
    as_json: bool,
) -> None:
    """Generate one completion."""
    from .runtime import Engine
    from .runtime.grammar import Grammar, GrammarError
    from .runtime.media import content_with_media

    if raw and (images or audios):
        raise MegrezError("--image and --audio need the chat template; leave out --raw")
    if prompt is None and not audios:
        raise MegrezError("generate needs --prompt TEXT (or --audio FILE, a spoken question)")
    grammar = None
    if json_schema is not None:
        try:
            grammar = Grammar.json_schema(json_schema.read_text(encoding="utf-8"))
        except (GrammarError, UnicodeDecodeError) as err:
            raise MegrezError(f"--json-schema {json_schema}: {err}") from None
    engine = Engine(model, model_lib, device)
    params = engine.default_sampling(
        grammar=grammar,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=list(stop),
        ignore_eos=ignore_eos,
    )
    content = content_with_media(prompt or "", list(images), list(audios))
    prompt_ids = (
        engine.tokenizer.encode(prompt) if raw else engine.encode_chat([{"role": "user", "content": content}])
    )
    if grammar is not None:
        try:
            engine.grammar_matcher(grammar)
        except GrammarError as err:
            message = f"--json-schema {json_schema}: the grammar engine cannot use it: {err}"
            raise MegrezError(message) from None
    if as_json:
        result = engine.generate(prompt_ids, params)
        click.echo(
            json.dumps(
                {"text": result.text, "token_ids": result.token_ids, "usage": result.usage},
                ensure_ascii=False,
            )
        )
        return
    for delta in engine.stream(prompt_ids, params):
        click.echo(delta.text, nl=False)
    click.echo()


def _model_source_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--model-lib, --device and --quantization, for verbs whose MODEL may also be a raw checkpoint."""
    options = [
        click.option(
            "--model-lib",
            type=click.Path(path_type=Path),
            default=None,
            help="Library from `megrez-mlc compile` (default: compiled on first use into $MEGREZ_MLC_HOME).",
        ),
        click.option(
            "--device", default="cpu", show_default=True, help="cpu, cuda, metal, webgpu, vulkan..."
        ),
        click.option(
            "--quantization",
            "-q",
            default=None,
            help="For a Hugging Face checkpoint: weight format (default: q4f32_1 on CPU, q4f16_1 on GPUs).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@main.command("chat")
@click.argument("model")
@_model_source_options
@click.option("--system", default=None, help="System prompt (default: Megrez's).")
@temperature_option
@top_p_option
@max_tokens_option(1024, "Longest answer.")
@_report_errors
def chat_cmd(
    model: str,
    model_lib: Path | None,
    device: str,
    quantization: str | None,
    system: str | None,
    temperature: float | None,
    top_p: float | None,
    max_tokens: int,
) -> None:
    """Chat in the terminal. MODEL: a converted folder, a Hugging Face checkpoint folder, or HF://org/name."""
    from .chat_repl import run_chat

    run_chat(
        model,
        model_lib=model_lib,
        device=device,
        quantization=quantization,
        system=system,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
    )


@main.command("serve")
@click.argument("model")
@_model_source_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=PORT, default=8000, show_default=True)
@click.option(
    "--max-num-sequence", type=COUNT, default=8, show_default=True, help="Requests decoded together, at most."
)
@click.option(
    "--max-total-seq-len",
    type=COUNT,
    default=None,
    help="KV-cache size in tokens, shared by all sequences (default: the context window).",
)
@click.option("--prefill-chunk-size", type=COUNT, default=None, help="Most prompt tokens per prefill call.")
@click.option(
    "--max-queue",
    type=_IntRange(0),
    default=64,
    show_default=True,
    help="Requests that may wait for a free sequence; more get a 429.",
)
@click.option(
    "--prefix-cache",
    type=_IntRange(0),
    default=None,
    help="Finished requests' KV-cache sequences kept, so that a prompt repeating one's tokens (the next turn "
    "of a chat) prefills only the rest; 0 turns it off (default: --max-num-sequence).",
)
@click.option(
    "--api-key",
    envvar="MEGREZ_MLC_API_KEY",
    default=None,
    help="Require `Authorization: Bearer KEY` on every request (or set MEGREZ_MLC_API_KEY).",
)
@click.option("--served-model-name", default=None, help="The name clients use (default: MODEL's name).")
@click.option("--threads", type=COUNT, default=None, help="CPU threads (default: the physical cores).")
@click.option(
    "--allowed-media-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Let image_url parts name local files under this folder (default: data: URIs only).",
)
@_report_errors
def serve_cmd(
    model: str,
    model_lib: Path | None,
    device: str,
    quantization: str | None,
    host: str,
    port: int,
    max_num_sequence: int,
    max_total_seq_len: int | None,
    prefill_chunk_size: int | None,
    max_queue: int,
    prefix_cache: int | None,
    api_key: str | None,
    served_model_name: str | None,
    threads: int | None,
    allowed_media_dir: Path | None,
) -> None:
    """OpenAI-compatible HTTP server with continuous batching. MODEL: as for `chat`."""
    from .serve.server import run_server

    run_server(
        model,
        model_lib=model_lib,
        device=device,
        quantization=quantization,
        host=host,
        port=port,
        max_num_sequence=max_num_sequence,
        max_total_seq_len=max_total_seq_len,
        prefill_chunk_size=prefill_chunk_size,
        max_queue=max_queue,
        prefix_cache=prefix_cache,
        api_key=api_key,
        served_name=served_model_name,
        threads=threads,
        allowed_media_dir=allowed_media_dir,
    )


@main.command("bench")
@click.argument("model", type=click.Path(path_type=Path))
@_model_lib_option
@click.option("--prompt-len", type=COUNT, default=128, show_default=True, help="Prompt tokens per sequence.")
@click.option("--gen-len", type=COUNT, default=128, show_default=True, help="Generated tokens per sequence.")
@click.option("--batch", type=COUNT, default=1, show_default=True, help="Sequences decoded together.")
@click.option("--threads", type=COUNT, default=None, help="CPU threads (default: the physical cores).")
@click.option("--runs", type=COUNT, default=3, show_default=True, help="Measured runs (the median is shown).")
@click.option(
    "--image",
    type=click.Path(path_type=Path),
    default=None,
    help="Omni models: also encode this image, slice by slice, and put it before every prompt.",
)
@click.option(
    "--audio",
    type=click.Path(path_type=Path),
    default=None,
    help="Omni models: also encode this audio file (per second of audio), and put it before every prompt.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line instead of a table.")
@_report_errors
def bench_cmd(
    model: Path,
    model_lib: Path,
    device: str,
    prompt_len: int,
    gen_len: int,
    batch: int,
    threads: int | None,
    runs: int,
    image: Path | None,
    audio: Path | None,
    as_json: bool,
) -> None:
    """Measure prefill and decode speed (random prompts, greedy decoding)."""
    from .runtime.bench import run_bench

    result = run_bench(
        model,
        model_lib,
        device=device,
        prompt_len=prompt_len,
        gen_len=gen_len,
        batch=batch,
        threads=threads,
        runs=runs,
        image=image,
        audio=audio,
    )
    if as_json:
        click.echo(json.dumps(result.to_json()))
        return
    with_image = f" + {result.image_tokens} image tok" if image else ""
    with_image += f" + {result.audio_tokens} audio tok" if audio else ""
    click.echo(
        f"{model} on {device}, {result.threads} threads; prompt {prompt_len} tok{with_image}, generate "
        f"{gen_len} tok, batch {batch}; median of {runs} runs"
    )
    if image is not None:
        per_slice = result.image_encode_ms_per_slice
        click.echo(f"  {'image encode':<20}{per_slice:8.0f} ms/slice ({result.image_slices} slices)")
    if audio is not None:
        per_second = result.audio_encode_ms_per_second
        seconds = result.audio_seconds
        click.echo(f"  {'audio encode':<20}{per_second:8.0f} ms per second of audio ({seconds:.1f} s)")
    for label, value in (
        ("prefill", f"{result.prefill_tok_s:8.1f} tok/s"),
        ("decode", f"{result.decode_tok_s:8.1f} tok/s"),
        ("time to first token", f"{result.ttft_ms:8.0f} ms"),
        ("peak RSS", f"{result.peak_rss_mb:8.0f} MB"),
    ):
        click.echo(f"  {label:<20}{value}")


@main.command("demo")
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where to build the demo (default: $MEGREZ_MLC_HOME/demo).",
)
@click.option("--quantization", "-q", default="q4f32_1", show_default=True)
@click.option(
    "--prompt", "-p", default=None, help="The prompt (default: a greeting, or a question on the image)."
)
@click.option(
    "--omni", is_flag=True, help="A tiny Megrez-3B-Omni, a synthetic image and clip: the media paths."
)
@_report_errors
def demo_cmd(workdir: Path | None, quantization: str, prompt: str | None, omni: bool) -> None:
    """Build a tiny random Megrez-shaped model and run the whole pipeline on it."""
    from .demo import run_demo

    prompt = prompt or ("图片里有什么？" if omni else "你好，Megrez！")
    run_demo(workdir, quantization, prompt, echo=click.echo, omni=omni)


if __name__ == "__main__":
    main()
