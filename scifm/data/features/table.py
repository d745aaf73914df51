"""Tables -> one entry per cell (header row first) with its text tokens and grid coordinates."""

from __future__ import annotations

from typing import Any

import numpy as np

from scifm.data.features.padding import Groups
from scifm.core.errors import DocumentFormatError
from scifm.core.modalities import CAPTION_TOKENS

# collate output: cell_ids [B, C, CELL_TOKENS] text ids, cell_token_mask [B, C, CELL_TOKENS],
# cell_row [B, C] (0 = header), cell_col [B, C], cell_header [B, C] bool, cell_mask [B, C];
# caption_ids [B, T] text ids, caption_mask [B, T] (all False for a table without a caption)
GROUPS: Groups = {
    "cell_mask": ("cell_ids", "cell_token_mask", "cell_row", "cell_col", "cell_header"),
    "caption_mask": ("caption_ids",),
}
CELL_TOKENS = 8  # cells are short labels and values; a long cell keeps its first tokens


def _cell_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, (str, int, float)):
        return str(value)
    raise DocumentFormatError("bad_table", f"a cell must be a string, number or null, got {type(value).__name__}")


def table_cells(seg: dict, max_len: int) -> tuple[list[str], int, str | None]:
    """The checks: (each cell's text, header row first; the column count; the caption), or the
    DocumentFormatError that skips the document."""
    columns, rows, caption = seg.get("columns"), seg.get("rows"), seg.get("caption")
    if not isinstance(columns, list) or not columns or not isinstance(rows, list):
        raise DocumentFormatError("bad_table", "needs a non-empty 'columns' list and a 'rows' list")
    if any(not isinstance(row, list) or len(row) != len(columns) for row in rows):
        raise DocumentFormatError("bad_table", f"every row must have the {len(columns)} cells of 'columns'")
    if caption is not None and not isinstance(caption, str):
        raise DocumentFormatError("bad_table", "'caption' must be a string")
    grid = [columns, *rows]
    check_cells_fit(len(grid) * len(columns), max_len)
    return [_cell_text(v) for row in grid for v in row], len(columns), caption


def check_cells_fit(n_cells: int, max_len: int) -> None:
    if n_cells > max_len:
        raise DocumentFormatError("too_long", f"{n_cells} cells > max_len {max_len}")


def table_ids(cells: list[str], caption: str | None, tokenizer: Any) -> tuple[list[list[int]], list[int]]:
    """Each cell's first CELL_TOKENS text ids and the caption's first CAPTION_TOKENS: all a table's
    features take from the tokenizer (an indexed dataset stores them)."""
    cell_ids = [tokenizer.encode_text(text)[:CELL_TOKENS] for text in cells]
    return cell_ids, tokenizer.encode_text(caption)[:CAPTION_TOKENS] if caption else []


def table_features(cells: list[str], n_columns: int, caption: str | None, tokenizer: Any) -> dict[str, np.ndarray]:
    """The arrays of a table that passed `table_cells`."""
    cell_ids, caption_ids = table_ids(cells, caption, tokenizer)
    lengths = np.fromiter(map(len, cell_ids), dtype=np.int64, count=len(cell_ids))
    flat = np.fromiter((i for ids in cell_ids for i in ids), dtype=np.int64, count=int(lengths.sum()))
    return table_arrays(lengths, flat, n_columns, np.asarray(caption_ids, dtype=np.int64))


def table_arrays(cell_lengths: np.ndarray, flat_ids: np.ndarray, n_columns: int,
                 caption_ids: np.ndarray) -> dict[str, np.ndarray]:
    """The features from each cell's id count, all cells' ids one after another and the caption's ids."""
    n_cells = len(cell_lengths)
    cell_token_mask = np.arange(CELL_TOKENS) < cell_lengths[:, None]  # a cell's ids fill its first places
    cell_ids = np.zeros((n_cells, CELL_TOKENS), dtype=np.int64)
    cell_ids[cell_token_mask] = flat_ids
    cell_row, cell_col = np.divmod(np.arange(n_cells, dtype=np.int64), n_columns)
    return {
        "cell_ids": cell_ids,
        "cell_token_mask": cell_token_mask,
        "cell_row": cell_row,
        "cell_col": cell_col,
        "cell_header": cell_row == 0,
        "caption_ids": caption_ids.astype(np.int64),
    }
