"""Where megrez-mlc keeps what it builds for you: $MEGREZ_MLC_HOME, default ~/.cache/megrez-mlc."""

from __future__ import annotations

import os
from pathlib import Path


def megrez_home() -> Path:
    return Path(os.environ.get("MEGREZ_MLC_HOME") or Path.home() / ".cache" / "megrez-mlc")
