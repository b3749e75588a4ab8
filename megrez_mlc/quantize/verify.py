"""`verify`: is a converted model folder intact (every shard's size and md5) and complete (every tensor its
mlc-chat-config.json implies, with the right shape and dtype)? Reads every byte, so it catches a single
flipped bit that loading (which checks sizes and names only) cannot."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..artifacts.chat_config import read_chat_config
from ..artifacts.files import CHAT_CONFIG_FILE, INDEX_FILE
from ..artifacts.param_names import stored_model_tensors
from ..artifacts.schemes import get_scheme
from ..artifacts.tensor_cache import check_shard_sizes, file_md5, read_index, tensor_records
from ..errors import MegrezError
from .convert import show_progress, worker_count


@dataclass(frozen=True)
class VerifyResult:
    num_shards: int
    num_bytes: int
    num_tensors: int
    quantization: str | None  # from mlc-chat-config.json; None when the folder has only weights


def verify_model(model_dir: Path) -> VerifyResult:
    if not model_dir.is_dir():
        raise MegrezError(
            f"{model_dir} is not a directory; pass a folder made by `megrez-mlc convert-weight`"
        )
    index = read_index(model_dir)
    check_shard_sizes(model_dir, index)
    shards = index["records"]
    unlisted = [s["dataPath"] for s in shards if not s.get("md5sum")]
    if unlisted:
        raise MegrezError(f"{INDEX_FILE} gives no md5sum for {', '.join(unlisted[:3])}; cannot verify them")
    paths = [model_dir / s["dataPath"] for s in shards]
    with ThreadPoolExecutor(worker_count()) as pool:  # hashlib releases the GIL: one shard per core
        digests = list(
            tqdm(
                pool.map(file_md5, paths),
                total=len(paths),
                desc="verify",
                unit="shard",
                disable=not show_progress(),
                file=sys.stderr,
            )
        )
    bad = [s["dataPath"] for s, digest in zip(shards, digests) if digest != s["md5sum"]]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise MegrezError(
            f"{len(bad)} of {len(shards)} weight shards in {model_dir} fail their md5 check ({shown}): "
            "the files are corrupt or were modified; convert the weights again (or copy them again)"
        )
    quantization = check_tensors_match_chat_config(model_dir, index)
    return VerifyResult(
        len(shards), sum(s["nbytes"] for s in shards), len(tensor_records(index)), quantization
    )


def check_tensors_match_chat_config(model_dir: Path, index: dict) -> str | None:
    """Every tensor the folder's mlc-chat-config.json (model shape + quantization) implies is in the index
    with its shape and dtype; returns that quantization (None if the folder has no mlc-chat-config.json)."""
    if not (model_dir / CHAT_CONFIG_FILE).is_file():
        return None
    _, chat_config = read_chat_config(model_dir)
    quantization = chat_config.quantization
    scheme = get_scheme(quantization)
    records = tensor_records(index)
    for tensor in stored_model_tensors(chat_config.model_config, scheme):
        rec = records.get(tensor.name)
        if rec is None:
            raise MegrezError(
                f"tensor {tensor.name} that {CHAT_CONFIG_FILE} ({quantization}) implies is missing from "
                f"{model_dir / INDEX_FILE}; convert and gen-config from the same model and quantization"
            )
        if rec.shape != tensor.shape or rec.dtype != tensor.dtype:
            raise MegrezError(
                f"tensor {tensor.name} is {rec.dtype}{list(rec.shape)} in {model_dir / INDEX_FILE} but "
                f"{CHAT_CONFIG_FILE} ({quantization}) implies {tensor.dtype}{list(tensor.shape)}; "
                "convert and gen-config from the same model and quantization"
            )
    return quantization
