"""The files of an indexed dataset, its sidecar, and the tokenizer its ids belong to.

`scifm data tokenize --out PREFIX` writes, beside each other:
  PREFIX.json             the sidecar: format, tokenizer fingerprint, shards, counts, skipped documents
  PREFIX.tokenizer/       the tokenizer the ids were written with
  SHARD.bin, SHARD.idx    token ids: one Megatron sequence and one Megatron document per scifm document
  SHARD.docs.bin/.idx     each document's [id, source, skill, its molecules' atom counts, their bond
                          counts] as UTF-8 JSON bytes (uint8), same order
  SHARD.graphs.bin/.idx   each document's molecules' graph features (graphs.py), same order
  SHARD.payloads.bin/.idx each table's and figure's payload (payloads.py): one Megatron sequence per
                          item, one Megatron document per scifm document, same order
  SHARD.packing.npy       the packing index (packing_index.py): per document, what packing needs of it
SHARD is PREFIX itself, or PREFIX-00000, PREFIX-00001, ... with --docs-per-shard. The sidecar is
written last, so shards without one are an unfinished write and never read.
"""

from __future__ import annotations

import hashlib
import json
import struct
import warnings
from pathlib import Path
from types import ModuleType
from typing import Sequence

import numpy as np

from scifm.core.errors import DataError
from scifm.data.indexed.packing_index import DTYPE as INDEX_DTYPE, N_COLUMNS
from scifm.tokenizers import ScientificTokenizer

# 2: each document's molecules' atom counts beside its id, source and skill; 3: their graph features;
# 4: the packing index, and each shard's skill names (the index's skill codes); 5: tables and figures
FORMAT = "scifm-indexed/5"
# the suffixes of a shard's metadata, molecule graph and table and figure payload datasets
DOCS, GRAPHS, PAYLOADS = ".docs", ".graphs", ".payloads"
PARTS = ("", DOCS, GRAPHS, PAYLOADS)
PACKING = ".packing.npy"  # the suffix of a shard's packing index
SIDECAR_KEYS = ("tokenizer", "shards", "documents", "tokens", "skills", "skipped")


def megatron_indexed() -> ModuleType:
    """megatron.core.datasets.indexed_dataset, imported on first use (an optional dependency)."""
    try:
        with warnings.catch_warnings():  # megatron.core warns at import about GPU extensions it lacks
            warnings.simplefilter("ignore")
            from megatron.core.datasets import indexed_dataset
    except ImportError:
        raise DataError("indexed datasets need megatron-core: pip install 'scifm[megatron]'") from None
    return indexed_dataset


def sidecar_path(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + ".json")


def tokenizer_dir(sidecar: Path) -> Path:
    return sidecar.with_suffix(".tokenizer")


def shard_files(prefix: Path) -> list[Path]:
    """The nine files of one shard, tokens first."""
    return [*(Path(f"{prefix}{part}{ext}") for part in PARTS for ext in (".bin", ".idx")),
            Path(f"{prefix}{PACKING}")]


def file_digest(paths: Sequence[Path]) -> str:
    """SHA-256 over the files' bytes, read in blocks."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def read_sidecar(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: not found; an indexed source's path is the --out prefix of "
                        "`scifm data tokenize`, and a write that did not finish has no sidecar")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        valid = meta.get("format") == FORMAT and all(key in meta for key in SIDECAR_KEYS)
    except (ValueError, UnicodeDecodeError, AttributeError):  # not JSON, not UTF-8, not an object
        meta, valid = {}, False
    if str(meta.get("format", "")).startswith("scifm-indexed/") and meta["format"] != FORMAT:
        raise DataError(f"{path}: written in format {meta['format']}, this scifm reads {FORMAT}; "
                        "write the dataset again with `scifm data tokenize`")
    if not valid:
        raise DataError(f"{path}: not a sidecar of `scifm data tokenize` (format {FORMAT}); write the dataset again")
    return meta


def shard_bins(sidecar: Path) -> tuple[Path, ...]:
    """The token .bin file of every shard, in order."""
    return tuple(sidecar.parent / f"{shard['name']}.bin" for shard in read_sidecar(sidecar)["shards"])


class DocumentReader:
    """One of a shard's Megatron IndexedDatasets that holds one sequence per document, read a document
    at a time through its index's arrays and its memory-mapped .bin reader, without the layers of the
    dataset's own __getitem__ (slices, modes, a cache) that reading one document needs none of."""

    __slots__ = ("_dataset", "_read", "_dtype", "_pointers", "_lengths")

    def __init__(self, dataset):
        # held: the index's arrays view a map that the dataset's index closes when it is collected
        self._dataset = dataset
        self._read, self._dtype = dataset.bin_reader.read, dataset.index.dtype
        self._pointers, self._lengths = dataset.index.sequence_pointers, dataset.index.sequence_lengths

    def __len__(self) -> int:
        return len(self._lengths)

    def __getitem__(self, pos: int) -> np.ndarray:
        """A read-only view of the mapped file."""
        return self._read(self._dtype, self._lengths[pos], self._pointers[pos])


class PayloadReader(DocumentReader):
    """The payload dataset: one sequence per table or figure, a document's being those between its
    Megatron document indices."""

    __slots__ = ("_documents",)

    def __init__(self, dataset):
        super().__init__(dataset)
        self._documents = dataset.index.document_indices

    def __len__(self) -> int:
        return len(self._documents) - 1

    @property
    def n_items(self) -> int:
        return len(self._lengths)

    def __getitem__(self, pos: int) -> tuple[np.ndarray, ...]:
        """Its tables' and figures' payloads, in order: read-only views of the mapped file."""
        first, stop = self._documents[pos : pos + 2].tolist()
        return tuple(self._read(self._dtype, self._lengths[k], self._pointers[k]) for k in range(first, stop))


def open_shard(sidecar: Path, shard: dict) -> tuple:
    """Readers of a shard's token ids, its documents' metadata, their molecules' graphs and their
    tables' and figures' payloads (the last two None in a shard without any: Megatron cannot map
    the empty file)."""
    indexed = megatron_indexed()
    prefix = sidecar.parent / shard["name"]
    present = (True, True, shard["molecules"] > 0, shard["tables"] + shard["figures"] > 0)
    try:
        datasets = tuple((PayloadReader if part == PAYLOADS else DocumentReader)(indexed.IndexedDataset(f"{prefix}{part}"))
                         if there else None for part, there in zip(PARTS, present))
    except (AssertionError, OSError, ValueError, struct.error) as err:  # Megatron asserts on foreign files
        raise DataError(f"{prefix}.bin: not readable as an indexed dataset ({type(err).__name__}: {err}); "
                        "write it again with `scifm data tokenize`") from None
    held = sorted({len(dataset) for dataset in datasets if dataset is not None})
    if held != [shard["documents"]]:
        raise DataError(f"{prefix}.bin: holds {'/'.join(map(str, held))} documents, its sidecar "
                        f"{shard['documents']}; write the dataset again with `scifm data tokenize`")
    payloads = datasets[-1]
    if payloads is not None and payloads.n_items != shard["tables"] + shard["figures"]:
        raise DataError(f"{prefix}{PAYLOADS}.bin: holds {payloads.n_items} tables and figures, its sidecar "
                        f"{shard['tables'] + shard['figures']}; write the dataset again with `scifm data tokenize`")
    return datasets


def open_packing_index(sidecar: Path, shard: dict) -> np.ndarray:
    """A shard's packing index, memory-mapped: [documents, packing_index.N_COLUMNS] int32."""
    path = sidecar.parent / f"{shard['name']}{PACKING}"
    try:
        index = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not readable as a packing index ({type(err).__name__}: {err}); "
                        "write the dataset again with `scifm data tokenize`") from None
    if index.shape != (shard["documents"], N_COLUMNS) or index.dtype != INDEX_DTYPE:
        raise DataError(f"{path}: holds an array of shape {index.shape} ({index.dtype}), its sidecar says "
                        f"{shard['documents']} documents; write the dataset again with `scifm data tokenize`")
    return np.asarray(index)  # a plain ndarray over the same map: a memmap's rows cost a Python call each


def check_tokenizer(sidecar: Path, tokenizer: ScientificTokenizer) -> None:
    """Stored ids mean something only under the tokenizer they were written with."""
    want, have = read_sidecar(sidecar)["tokenizer"]["fingerprint"], tokenizer.fingerprint()
    if want != have:
        raise DataError(f"{sidecar}: its ids were written with tokenizer {want[:12]}, this run's is {have[:12]}; "
                        f"train with the one saved beside it ({tokenizer_dir(sidecar)}) or tokenize again")


def indexed_tokenizer(sidecars: Sequence[Path]) -> ScientificTokenizer | None:
    """The tokenizer saved beside the first indexed source (the loader checks every source against
    it); None without indexed sources."""
    return ScientificTokenizer.load(tokenizer_dir(sidecars[0])) if sidecars else None
