"""Tables and figures as an indexed dataset stores them: one byte string (a payload) per item.

Neither is token ids in the document's sequence (cells keep their grid, images their pixels), so a
stored document holds only their [START_X][END_X] markers and each item's payload is a sequence of
the shard's payload dataset, in the document's order:
- a table: little-endian int32 values: its cell count, column count and caption id count, each cell's
  id count (header row first), then every cell's ids one after another, then the caption's ids. These
  are all a table's features take from the tokenizer (table.table_ids), so the loader never tokenizes
  a table and the run's max_len is checked against the stored cell count.
- a figure: its image file's bytes as they are (a JPEG stays a JPEG), or an inline array as a PNG.
  Decoding them gives the pixels the JSONL line gives; only a rank that featurizes the row decodes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from scifm.core.encoders_config import FigureEncoderConfig
from scifm.data.features.figure import decoded_figure, figure_features
from scifm.data.features.table import table_arrays, table_ids

DTYPE = np.uint8
_INT = np.dtype("<i4")
_HEADER = 3  # cells, columns, caption ids


def table_payload(cells: list[str], n_columns: int, caption: str | None, tokenizer: Any) -> bytes:
    """The stored bytes of a table that passed table.table_cells."""
    cell_ids, caption_ids = table_ids(cells, caption, tokenizer)
    values = [len(cells), n_columns, len(caption_ids), *map(len, cell_ids),
              *(i for ids in cell_ids for i in ids), *caption_ids]
    return np.asarray(values, dtype=_INT).tobytes()


def table_cell_count(payload: np.ndarray) -> int:
    """What the table featurizer's length check measures."""
    return int(np.frombuffer(payload[: _INT.itemsize].tobytes(), _INT)[0])


def unpacked_table(payload: np.ndarray) -> dict[str, np.ndarray]:
    """The stored bytes -> the arrays table_features gives the table's JSONL segment."""
    values = np.frombuffer(payload.tobytes(), _INT).astype(np.int64)  # a copy: the map's bytes may be unaligned
    n_cells, n_columns, n_caption = values[:_HEADER].tolist()
    lengths = values[_HEADER : _HEADER + n_cells]
    flat = values[_HEADER + n_cells : len(values) - n_caption]
    return table_arrays(lengths, flat, n_columns, values[len(values) - n_caption :])


def stored_figure_features(payload: np.ndarray, cfg: FigureEncoderConfig) -> dict[str, np.ndarray]:
    """The stored bytes -> the patches figure_features gives the figure's JSONL segment."""
    return figure_features(decoded_figure(payload.tobytes()), cfg)
