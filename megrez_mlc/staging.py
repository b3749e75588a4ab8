"""Write outputs into a temporary folder beside the target and move them in only when complete.

The rules, so that nothing is lost or half-written:
- a target folder holding files megrez-mlc does not write is refused unless `force`; even then only files
  with the names of this verb's outputs are replaced, everything else is left alone;
- a failed or interrupted verb (an exception, Ctrl-C) deletes its temporary folder and leaves the target as
  it was; a temporary folder left by a killed process is removed by the next run that writes the same target;
- when replacing a previous output, its index files go first and come back last, so the folder never has
  an index pointing at data files of another conversion, even if the move itself is cut short;
- files of the previous output that the new one does not have (a shard of a larger conversion) are deleted
  only when the caller names them as written by that previous output (listed in its index).
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

from .artifacts.files import MODEL_DIR_PATTERNS
from .errors import MegrezError

PARTIAL_MARK = ".partial-"


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def check_writable(target: Path, *, folder: bool) -> None:
    """Refuse, before any work is done, an -o path this process cannot write: a file where a folder goes (or
    the reverse), a path under a file, or a read-only folder. Outputs are written beside `target` and then
    renamed, so its parent (or the nearest folder that exists above it) must be writable, and so must
    `target` itself when it is an existing folder that files are moved into."""
    if target.exists() and target.is_dir() != folder:
        kind = "not a folder" if folder else "a folder"
        raise MegrezError(f"output {target} exists and is {kind}; choose another -o path")
    above = target.absolute().parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise MegrezError(f"output {target} is under {above}, which is a file; choose another -o path")
    for place in (above, target) if folder and target.is_dir() else (above,):
        if not os.access(place, os.W_OK | os.X_OK):
            raise MegrezError(
                f"cannot write output {target}: {place} is read-only for this user; choose another -o path"
            )


def check_target_dir(target: Path, force: bool) -> bool:
    """Refuse a target holding files megrez-mlc does not write (unless force); True if it holds only ours."""
    check_writable(target, folder=True)
    if not target.is_dir():
        return True
    foreign = sorted(p.name for p in target.iterdir() if not _matches(p.name, MODEL_DIR_PATTERNS))
    if foreign and not force:
        shown = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise MegrezError(
            f"output {target} already holds files megrez-mlc did not write ({shown}); "
            "choose an empty -o folder or pass --force"
        )
    return not foreign


def _staging_name(target: Path, pid: int) -> Path:
    return target.parent / f".{target.name}{PARTIAL_MARK}{pid}"


def _process_is_gone(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by someone else
        return False
    return False


def remove_abandoned_staging(target: Path) -> None:
    """Delete temporary folders of earlier runs on this target whose process no longer exists (killed)."""
    if not target.parent.is_dir():
        return
    for path in target.parent.glob(f".{target.name}{PARTIAL_MARK}*"):
        pid = path.name.rpartition(PARTIAL_MARK)[2]
        if path.is_dir() and pid.isdigit() and int(pid) != os.getpid() and _process_is_gone(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def staged_model_dir(target: Path, force: bool, superseded: Collection[str] = ()) -> Iterator[Path]:
    """Yield a fresh temp folder; on success move its files into the target.

    `superseded`: names of files the target's previous output of this verb wrote (from its index); those
    the new output lacks are deleted. Nothing else in the target is ever deleted.
    """
    only_ours = check_target_dir(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_staging(target)
    staging = _staging_name(target, os.getpid())
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if not target.exists():
            staging.rename(target)
            return
        new_files = sorted(staging.iterdir(), key=lambda p: p.suffix == ".json")  # indexes last
        for index in (p for p in new_files if p.suffix == ".json"):
            (target / index.name).unlink(missing_ok=True)  # first: no index may point at a mix of files
        if only_ours:
            for name in superseded:
                # Only plain names of files megrez-mlc writes: an index is data, never a path to follow.
                if (
                    Path(name).name == name
                    and _matches(name, MODEL_DIR_PATTERNS)
                    and not (staging / name).exists()
                ):
                    (target / name).unlink(missing_ok=True)  # e.g. a shard of an earlier, larger conversion
        for new in new_files:
            os.replace(new, target / new.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
