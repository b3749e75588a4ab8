"""`megrez-mlc demo`: the set-up-and-run command of the README, end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .conftest import run_cli


def test_demo_runs_every_step_and_its_output_is_reproducible(tmp_path: Path) -> None:
    proc = run_cli("demo", "--workdir", str(tmp_path))
    steps = re.findall(r"^\[\s*[\d.]+ s\] (\S+)", proc.stdout, flags=re.M)
    assert steps == ["checkpoint:", "convert-weight", "gen-config", "compile", "load", "generate"]
    token_ids = json.loads(re.search(r"^token ids: (\[.*\])$", proc.stdout, flags=re.M).group(1))
    model_dir = tmp_path / "tiny-megrez-q4f32_1"
    again = run_cli(
        "generate",
        str(model_dir),
        "--model-lib",
        str(model_dir / "tiny-megrez-q4f32_1-cpu.so"),
        "--prompt",
        "你好，Megrez！",
        "--temperature",
        "0",
        "--max-tokens",
        "24",
        "--json",
    )
    assert json.loads(again.stdout)["token_ids"] == token_ids
