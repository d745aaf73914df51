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
    n_cells = len(grid) * len(columns)
    if n_cells > max_len:
        raise DocumentFormatError("too_long", f"{n_cells} cells > max_len {max_len}")
    return [_cell_text(v) for row in grid for v in row], len(columns), caption


def table_features(cells: list[str], n_columns: int, caption: str | None, tokenizer: Any) -> dict[str, np.ndarray]:
    """The arrays of a table that passed `table_cells`."""
    n_cells = len(cells)
    cell_ids = np.zeros((n_cells, CELL_TOKENS), dtype=np.int64)
    cell_token_mask = np.zeros((n_cells, CELL_TOKENS), dtype=bool)
    for i, text in enumerate(cells):
        ids = tokenizer.encode_text(text)[:CELL_TOKENS]
        cell_ids[i, : len(ids)] = ids
        cell_token_mask[i, : len(ids)] = True
    cell_row, cell_col = np.divmod(np.arange(n_cells, dtype=np.int64), n_columns)
    caption_ids = tokenizer.encode_text(caption)[:CAPTION_TOKENS] if caption else []
    return {
        "cell_ids": cell_ids,
        "cell_token_mask": cell_token_mask,
        "cell_row": cell_row,
        "cell_col": cell_col,
        "cell_header": cell_row == 0,
        "caption_ids": np.asarray(caption_ids, dtype=np.int64),
    }
