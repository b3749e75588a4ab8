"""Write outputs into a temporary folder beside the target and move them in only when complete.

A failed or interrupted verb then leaves the target as it was: no partial model, and files the verb did
not write are never deleted.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import MegrezError

# Everything convert-weight and gen-config write; a folder holding only these is a previous output.
MODEL_DIR_PATTERNS = (
    "params_shard_*.bin",
    "tensor-cache.json",
    "mlc-chat-config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def check_target_dir(target: Path, force: bool) -> None:
    if target.exists() and not target.is_dir():
        raise MegrezError(f"output {target} exists and is not a directory; choose another -o path")
    if not target.is_dir() or force:
        return
    foreign = sorted(p.name for p in target.iterdir() if not _matches(p.name, MODEL_DIR_PATTERNS))
    if foreign:
        shown = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise MegrezError(
            f"output {target} already holds files megrez-mlc did not write ({shown}); "
            "choose an empty -o folder or pass --force"
        )


@contextlib.contextmanager
def staged_model_dir(target: Path, owned: Sequence[str], force: bool) -> Iterator[Path]:
    """Yield a fresh temp folder; on success replace the target's `owned` files with its content."""
    check_target_dir(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if not target.exists():
            staging.rename(target)
            return
        for old in target.iterdir():
            if _matches(old.name, owned) and not (staging / old.name).exists():
                old.unlink()  # a stale shard of an earlier, larger conversion
        # Indexes last, so the folder never points at shards that are not there yet.
        for new in sorted(staging.iterdir(), key=lambda p: p.suffix == ".json"):
            os.replace(new, target / new.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_file_atomically(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        partial.write_bytes(data)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
