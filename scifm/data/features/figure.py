"""Figures -> RGB patches with their (row, col) grid positions, aspect ratio kept.

Images are converted to RGB (grayscale is replicated into three channels): plots and micrographs
carry meaning in colour, and one channel count keeps the patch embedding a single Linear.
Pixel values stay bytes (0..255) up to the encoder, which scales them to [0, 1]: a batch of figures
is a quarter of the size it would be as floats where it is collated, sent from the data worker
(pickled) and copied to the GPU (bench/data.py, part 5).

A batch's figures differ in size (a small one keeps its own), so the collate packs them into rows
of the largest one's patch count, several small figures to a row, instead of padding each to the
largest: the encoder then runs over about as many positions as there are patches
(bench/figure_packing.py), and attends within each figure only.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from scifm.core.encoders_config import FigureEncoderConfig
from scifm.core.errors import DocumentFormatError
from scifm.core.modalities import grid_side

# collate output (collate_figures), for F figures packed into R rows of C positions:
# patches [R, C, patch_size * patch_size * CHANNELS] uint8, patch_pos [R, C, 2] (row, col),
# patch_figure [R, C] the figure (0..F-1, in the items' order) each position holds, -1 on padding,
# figure_row [F] the row that holds each figure


def target_size(height: int, width: int, cfg: FigureEncoderConfig) -> tuple[int, int]:
    """(height, width) in whole patches, aspect kept: the longer side at max_side, or, for a smaller
    image unless cfg.upscale, at its own length rounded to whole patches (at least one)."""
    longer = max(height, width)
    long_cells = grid_side(cfg)
    if not cfg.upscale:
        long_cells = min(long_cells, max(1, round(longer / cfg.patch_size)))
    scale = long_cells / longer
    rows = max(1, round(height * scale))
    cols = max(1, round(width * scale))
    return rows * cfg.patch_size, cols * cfg.patch_size


def _from_array(data: object) -> Image.Image:
    try:
        arr = np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError):  # ragged nesting or non-numbers
        raise DocumentFormatError("bad_figure", "'array' must be a rectangular nested list of numbers") from None
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))) or arr.size == 0:
        raise DocumentFormatError("bad_figure", f"'array' must be HxW or HxWxC with C in 1, 3, 4; got {arr.shape}")
    if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 255:
        raise DocumentFormatError("bad_figure", "'array' values must be finite and in 0..1 or 0..255")
    if arr.max() <= 1.0:  # values in 0..1
        arr = arr * 255.0
    return Image.fromarray(np.rint(arr).astype(np.uint8)).convert("RGB")


def _from_path(path: object, base_dir: Path) -> tuple[Image.Image, bytes]:
    if not isinstance(path, str) or not path:
        raise DocumentFormatError("bad_figure", "'path' must be a non-empty string")
    full = base_dir / path
    try:
        data = full.read_bytes()
    except OSError as e:
        raise DocumentFormatError("bad_figure", f"cannot read image {full}: {type(e).__name__}: {e}") from None
    return decoded_figure(data, str(full)), data


def decoded_figure(data: bytes, where: str = "a stored figure") -> Image.Image:
    """An image file's bytes decoded to RGB (the same pixels whether read from its file or from an
    indexed dataset, which stores the bytes)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except Exception as e:  # PIL decoders raise many types (OSError, ValueError, SyntaxError, bombs)
        raise DocumentFormatError("bad_figure", f"cannot read image {where}: {type(e).__name__}: {e}") from None


def patchify(pixels_HWC: np.ndarray, patch_size: int) -> dict[str, np.ndarray]:
    """Row-major patches [N, P*P*C] and their (row, col) positions [N, 2]."""
    h, w, c = pixels_HWC.shape
    rows, cols = h // patch_size, w // patch_size
    patches = (
        pixels_HWC.reshape(rows, patch_size, cols, patch_size, c)
        .transpose(0, 2, 1, 3, 4)
        .reshape(rows * cols, patch_size * patch_size * c)
    )
    pos = np.stack(np.divmod(np.arange(rows * cols, dtype=np.int64), cols), axis=1)
    return {"patches": np.ascontiguousarray(patches), "patch_pos": pos}


def read_figure(seg: dict, base_dir: Path) -> Image.Image:
    """The check: the figure decoded to RGB, or the DocumentFormatError that skips the document."""
    return _from_array(seg["array"]) if "array" in seg else _from_path(seg.get("path"), base_dir)[0]


def figure_file(seg: dict, base_dir: Path) -> bytes:
    """The check, as an indexed dataset stores a figure: its image file's bytes as they are, or an
    inline array as a PNG (lossless, so it decodes to the pixels read_figure gives)."""
    if "array" not in seg:
        return _from_path(seg.get("path"), base_dir)[1]
    out = io.BytesIO()
    _from_array(seg["array"]).save(out, format="PNG")
    return out.getvalue()


def collate_figures(items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Packs the figures into rows of the largest one's patch count, first fit, largest first (ties
    in the items' order); a figure's patches stay together and in order."""
    sizes = [len(item["patches"]) for item in items]
    capacity = max(sizes)
    row_of, used = [0] * len(items), []  # each figure's row; each row's filled positions
    for f in sorted(range(len(items)), key=lambda f: -sizes[f]):
        row = next((r for r, n in enumerate(used) if n + sizes[f] <= capacity), len(used))
        if row == len(used):
            used.append(0)
        row_of[f], used[row] = row, used[row] + sizes[f]
    first = items[0]
    patches_RCP = np.zeros((len(used), capacity, first["patches"].shape[1]), dtype=first["patches"].dtype)
    pos_RC2 = np.zeros((len(used), capacity, 2), dtype=first["patch_pos"].dtype)
    figure_RC = np.full((len(used), capacity), -1, dtype=np.int64)
    filled = [0] * len(used)
    for f, item in enumerate(items):
        r, start = row_of[f], filled[row_of[f]]
        end = start + sizes[f]
        patches_RCP[r, start:end], pos_RC2[r, start:end] = item["patches"], item["patch_pos"]
        figure_RC[r, start:end], filled[r] = f, end
    return {"patches": torch.from_numpy(patches_RCP), "patch_pos": torch.from_numpy(pos_RC2),
            "patch_figure": torch.from_numpy(figure_RC), "figure_row": torch.tensor(row_of, dtype=torch.int64)}


def figure_features(image: Image.Image, cfg: FigureEncoderConfig) -> dict[str, np.ndarray]:
    """The patches of a figure that `read_figure` decoded."""
    height, width = target_size(image.height, image.width, cfg)
    resized = image.resize((width, height), Image.Resampling.BICUBIC)
    return patchify(np.asarray(resized), cfg.patch_size)
