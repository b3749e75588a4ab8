"""Images to what `image_embed` takes: decoding, MiniCPM-V's slicing, patches, position ids, placeholders.

All of it is Pillow and numpy (no torch at run time). The slicing follows MiniCPM-V's image processor, which
Megrez-3B-Omni uses: an image of more than `scale_resolution`² pixels is cut into the grid of slices, among
those with one slice fewer, as many or one more than its area calls for (at most `max_slice_nums`), whose
aspect ratio is closest to the image's (in log space; the first such grid wins a tie); the grid is resized so
that each slice has about `scale_resolution`² pixels, sides multiples of the patch size. A resized whole
image (the "source") always comes first. Sides round with Python's round() (halves to even), as there.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MegrezError
from .config import ImageProcessorConfig, VisionConfig

MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # a decoded image larger than this is refused (a decompression bomb)
MAX_IMAGE_BYTES = 32 * 1024 * 1024


def max_slice_patches(config: ImageProcessorConfig) -> int:
    """The most patches one slice may have (image_embed is compiled for this many): twice a square slice's,
    room for the rounding of very elongated slices."""
    return 2 * (config.scale_resolution // config.patch_size + 1) ** 2


@dataclass(frozen=True)
class Grid:
    cols: int
    rows: int

    @property
    def slices(self) -> int:
        return self.cols * self.rows


def ensure_divide(length: float, patch_size: int) -> int:
    """The multiple of patch_size nearest to length (at least one patch)."""
    return max(round(length / patch_size) * patch_size, patch_size)


def best_resize(size: tuple[float, float], scale: int, patch: int, upscale: bool) -> tuple[int, int]:
    """(width, height) of about scale² pixels with the aspect ratio of `size`, sides multiples of the patch;
    an image already smaller keeps its size (rounded to patches) unless `upscale`."""
    width, height = size
    if width * height > scale * scale or upscale:
        ratio = width / height
        height = int(scale / math.sqrt(ratio))
        width = int(height * ratio)
    return ensure_divide(width, patch), ensure_divide(height, patch)


def best_grid(width: int, height: int, scale: int, max_slices: int) -> Grid | None:
    """The slice grid for an image, None when it is not sliced (at most one slice's area)."""
    multiple = min(math.ceil(width * height / (scale * scale)), max_slices)
    if multiple <= 1:
        return None
    log_ratio = math.log(width / height)
    best, best_error = None, math.inf
    for count in (multiple - 1, multiple, multiple + 1):
        if count == 1 or count > max_slices:
            continue
        for cols in range(1, count + 1):
            if count % cols == 0:
                error = abs(log_ratio - math.log(cols / (count // cols)))
                if error < best_error:
                    best, best_error = Grid(cols, count // cols), error
    return best


def refine_size(width: int, height: int, grid: Grid, scale: int, patch: int) -> tuple[int, int]:
    """The size the image is resized to before it is cut into `grid` slices of equal size."""
    slice_w = ensure_divide(width, grid.cols) / grid.cols
    slice_h = ensure_divide(height, grid.rows) / grid.rows
    best_w, best_h = best_resize((slice_w, slice_h), scale, patch, upscale=True)
    return best_w * grid.cols, best_h * grid.rows


@dataclass(frozen=True)
class SlicedImage:
    """The source image and the grid's slices (row by row), each a uint8 [height, width, 3] array."""

    source: np.ndarray
    grid: Grid | None
    slices: tuple[np.ndarray, ...]

    @property
    def all_slices(self) -> tuple[np.ndarray, ...]:
        """In the order of their placeholders: the source, then the grid's slices."""
        return (self.source, *self.slices)


def slice_image(image, config: ImageProcessorConfig) -> SlicedImage:
    """Cut a Pillow RGB image as MiniCPM-V does (see the module docstring)."""
    from PIL import Image

    scale, patch = config.scale_resolution, config.patch_size
    width, height = image.size
    grid = best_grid(width, height, scale, config.max_slice_nums)
    source_size = best_resize((width, height), scale, patch, upscale=grid is None)
    source = np.asarray(image.resize(source_size, Image.Resampling.BICUBIC))
    if grid is None:
        return SlicedImage(source, None, ())
    refined = np.asarray(
        image.resize(refine_size(width, height, grid, scale, patch), Image.Resampling.BICUBIC)
    )
    slice_h, slice_w = refined.shape[0] // grid.rows, refined.shape[1] // grid.cols
    slices = tuple(
        refined[r * slice_h : (r + 1) * slice_h, c * slice_w : (c + 1) * slice_w]
        for r in range(grid.rows)
        for c in range(grid.cols)
    )
    return SlicedImage(source, grid, slices)


def decode_image(data: bytes, what: str = "the image"):
    """Bytes of an image file (PNG, JPEG, WebP, GIF, BMP...) as a Pillow RGB image; a clear error for
    anything else."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise MegrezError(f"{what} is empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise MegrezError(
            f"{what} is {len(data) / 2**20:.1f} MiB; images of at most {MAX_IMAGE_BYTES >> 20} MiB"
        )
    try:
        with Image.open(io.BytesIO(data)) as opened:
            width, height = opened.size
            if width * height > MAX_IMAGE_PIXELS:
                raise MegrezError(
                    f"{what} is {width}x{height} pixels, more than {MAX_IMAGE_PIXELS >> 20} M; scale it down"
                )
            return opened.convert("RGB")
    except MegrezError:
        raise
    except UnidentifiedImageError:
        raise MegrezError(f"{what} is not an image Pillow can read (PNG, JPEG, WebP, GIF, BMP...)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise MegrezError(f"{what} cannot be decoded: {err}") from None


def read_image_file(path: str | Path):
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise MegrezError(f"cannot read image {path}: {err.strerror or err}") from None
    return decode_image(data, f"image {path}")


# --- one slice as image_embed's inputs ---------------------------------------------------------------------


def patches(pixels: np.ndarray, patch: int) -> np.ndarray:
    """A uint8 [h*patch, w*patch, 3] slice as [h*w, 3*patch*patch] float32 rows, patches row by row, each
    flattened channel-major (the order of the patch convolution's weights), scaled to (x - 127.5) / 127.5."""
    rows, cols = pixels.shape[0] // patch, pixels.shape[1] // patch
    x = pixels.astype(np.float32).reshape(rows, patch, cols, patch, 3).transpose(0, 2, 4, 1, 3)
    return ((x.reshape(rows * cols, 3 * patch * patch) - 127.5) / 127.5).astype(np.float32)


def position_ids(rows: int, cols: int, per_side: int) -> np.ndarray:
    """Which of the per_side² learned positions each patch of a rows x cols slice takes (NaViT's
    fractional bucketing, computed in float32 as transformers' Idefics2VisionEmbeddings does)."""
    boundaries = (np.arange(1, per_side, dtype=np.float64) / per_side).astype(np.float32)

    def buckets(n: int) -> np.ndarray:
        step = np.float32(1.0) / np.float32(n)
        coords = np.minimum(np.arange(n, dtype=np.float32) * step, np.float32(1.0 - 1e-6))
        return np.searchsorted(boundaries, coords, side="right")

    return (buckets(rows)[:, None] * per_side + buckets(cols)[None, :]).reshape(-1).astype(np.int32)


def sincos_2d(rows: int, cols: int, dim: int) -> np.ndarray:
    """The resampler's 2-D sin-cos position embedding of a rows x cols grid, [rows*cols, dim]: the first
    half encodes the column, the second the row, each as sin then cos of position x 10000^(-i/(dim/4))."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)

    def encode(pos: np.ndarray) -> np.ndarray:
        angles = pos[:, None] * omega[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    col, row = np.meshgrid(np.arange(cols, dtype=np.float64), np.arange(rows, dtype=np.float64))
    return np.concatenate([encode(col.reshape(-1)), encode(row.reshape(-1))], axis=1).astype(np.float32)


@dataclass(frozen=True)
class SliceInputs:
    patches: np.ndarray  # [n, 3*patch*patch] float32
    position_ids: np.ndarray  # [n] int32
    key_positions: np.ndarray  # [n, llm hidden] float32
    rows: int
    cols: int


def slice_inputs(pixels: np.ndarray, vision: VisionConfig, llm_hidden: int) -> SliceInputs:
    patch = vision.patch_size
    rows, cols = pixels.shape[0] // patch, pixels.shape[1] // patch
    return SliceInputs(
        patches(pixels, patch),
        position_ids(rows, cols, vision.patches_per_side),
        sincos_2d(rows, cols, llm_hidden),
        rows,
        cols,
    )


# --- the prompt's placeholder ----------------------------------------------------------------------------


def placeholder_ids(grid: Grid | None, config: ImageProcessorConfig, newline_ids: list[int]) -> list[int]:
    """The token ids an image stands for in the prompt (see ImageProcessorConfig); `newline_ids` are the
    row separator's tokens."""
    ids = config.token_ids
    filler = [ids[config.unk]] * config.query_num

    def wrapped(start: str, end: str) -> list[int]:
        return [ids[start], *filler, ids[end]]

    out = wrapped(config.image_start, config.image_end)
    if grid is not None:
        for row in range(grid.rows):
            if row:
                out += newline_ids
            for _ in range(grid.cols):
                out += wrapped(config.slice_start, config.slice_end)
    return out


def embedding_spans(ids: list[int], config: ImageProcessorConfig) -> list[tuple[int, int]]:
    """[start, end) of each slice's filler run in a placeholder, in order."""
    unk = config.token_ids[config.unk]
    spans, start = [], None
    for i, token in enumerate([*ids, -1]):
        if token == unk and start is None:
            start = i
        elif token != unk and start is not None:
            spans.append((start, i))
            start = None
    return spans
