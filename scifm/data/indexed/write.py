"""`scifm data tokenize`: JSONL documents -> an indexed dataset (files.py names its files).

Documents are read as the loader reads them (bytes, a line at a time), tokenized once with a saved
tokenizer in `workers` processes (chunks of lines, a bounded number in flight, results taken in input
order, so the bytes written do not depend on the number of workers) and appended with Megatron-Core's
IndexedDatasetBuilder, in the id width Megatron picks for the vocabulary; tables and figures go
beside them as payloads (payloads.py), a figure's path read relative to its JSONL file, as training
reads it. A line that is not a document, or an item the featurizers refuse under any encoder, is
skipped and counted by reason, with its first example. Every file is written under a temporary
name and renamed at the end; the sidecar comes last and marks the dataset complete.
"""

from __future__ import annotations

import array
import json
import multiprocessing
import os
from collections import Counter, deque
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from scifm.core.errors import DataError, DocumentFormatError
from scifm.data.build_once import swap_in
from scifm.data.documents import SPLITS, DamagedFileError, jsonl_files, parse_line, read_lines, split_of
from scifm.data.indexed.files import (DOCS, FORMAT, GRAPHS, PACKING, PAYLOADS, file_digest, megatron_indexed,
                                      shard_files, sidecar_path, tokenizer_dir)
from scifm.data.indexed.graphs import DTYPE as GRAPH_DTYPE
from scifm.data.indexed.payloads import DTYPE as PAYLOAD_DTYPE
from scifm.data.indexed.layout import StoredDocument, stored_document
from scifm.data.indexed.packing_index import DTYPE as INDEX_DTYPE, N_COLUMNS, index_row
from scifm.tokenizers import ScientificTokenizer


class _ShardWriter:
    """One shard, written under a temporary prefix beside its final one."""

    def __init__(self, final: Path, dtype: type):
        indexed = megatron_indexed()
        self.final = final
        self.temp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        self.tokens = indexed.IndexedDatasetBuilder(f"{self.temp}.bin", dtype=dtype)
        self.docs = indexed.IndexedDatasetBuilder(f"{self.temp}{DOCS}.bin", dtype=np.uint8)
        self.graphs = indexed.IndexedDatasetBuilder(f"{self.temp}{GRAPHS}.bin", dtype=GRAPH_DTYPE)
        self.payloads = indexed.IndexedDatasetBuilder(f"{self.temp}{PAYLOADS}.bin", dtype=PAYLOAD_DTYPE)
        self.index_rows = array.array("i")  # flat, 4 bytes a value: a Python list per row would take about 5x
        self.skill_codes: dict[str, int] = {}  # the shard's skills, numbered in order of appearance
        self.documents = self.n_tokens = self.molecules = self.tables = self.figures = 0

    def add(self, doc_id: str, source: str, skill: str, stored: StoredDocument, split: str) -> None:
        skill_code = self.skill_codes.setdefault(skill, len(self.skill_codes))
        self.index_rows.extend(index_row(stored, split, skill_code))
        self.tokens.add_document(stored.ids, [len(stored.ids)])
        record = json.dumps([doc_id, source, skill, stored.atoms, stored.bonds], ensure_ascii=False).encode("utf-8")
        self.docs.add_document(np.frombuffer(record, dtype=np.uint8), [len(record)])
        self.graphs.add_document(stored.graphs, [len(stored.graphs)])
        self.payloads.add_document(np.frombuffer(b"".join(stored.payloads), dtype=PAYLOAD_DTYPE),
                                   [len(payload) for payload in stored.payloads])
        self.documents += 1
        self.n_tokens += len(stored.ids)
        self.molecules += len(stored.atoms)
        self.tables += sum(kind == "table" for kind, _, _ in stored.items)
        self.figures += sum(kind == "figure" for kind, _, _ in stored.items)

    def finish(self) -> dict:
        self.tokens.finalize(f"{self.temp}.idx")
        self.docs.finalize(f"{self.temp}{DOCS}.idx")
        self.graphs.finalize(f"{self.temp}{GRAPHS}.idx")
        self.payloads.finalize(f"{self.temp}{PAYLOADS}.idx")
        with open(f"{self.temp}{PACKING}", "wb") as fh:  # a file object: np.save would append .npy to the name
            np.save(fh, np.asarray(self.index_rows, dtype=INDEX_DTYPE).reshape(-1, N_COLUMNS))
        return {"name": self.final.name, "documents": self.documents, "tokens": self.n_tokens,
                "molecules": self.molecules, "tables": self.tables, "figures": self.figures, "skills": list(self.skill_codes),
                "sha256": file_digest(shard_files(self.temp))}

    def commit(self) -> None:
        for temp, final in zip(shard_files(self.temp), shard_files(self.final)):
            os.replace(temp, final)


class _Skips:
    def __init__(self):
        self.counts: Counter = Counter()
        self.examples: dict[str, str] = {}

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, where)


def tokenize_corpus(inputs: list[str], tokenizer_path: Path, out: Path, docs_per_shard: int = 0,
                    workers: int = 1) -> dict:
    """Writes the dataset at prefix `out` from JSONL files or directories; returns its sidecar."""
    if docs_per_shard < 0:
        raise DataError(f"--docs-per-shard must be >= 0 (0 = one shard), got {docs_per_shard}")
    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    if not out.name or out.is_dir():
        raise DataError(f"--out {out}: a prefix of file names (e.g. DIR/corpus), not a directory")
    tokenizer = ScientificTokenizer.load(tokenizer_path)
    missing = [path for path in inputs if not Path(path).exists()]
    if missing:  # jsonl_files would point at data.sources, which this command does not read
        raise DataError(f"{missing[0]}: no such file or directory")
    files = [f for path in inputs for f in jsonl_files(path)]
    dtype = megatron_indexed().DType.optimal_dtype(tokenizer.vocab_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    skips, skills = _Skips(), {split: Counter() for split in SPLITS}
    finished: list[_ShardWriter] = []
    shards: list[dict] = []
    writer: _ShardWriter | None = None
    try:
        for where, stored, reason in _stored_documents(_lines(files, skips), tokenizer, tokenizer_path, workers):
            if reason is not None:
                skips.add(reason, where)
                continue
            if writer is None:
                name = out.name if docs_per_shard == 0 else f"{out.name}-{len(shards):05d}"
                writer = _ShardWriter(out.with_name(name), dtype)
            doc_id, _, skill, _ = stored
            split = split_of(doc_id)
            writer.add(*stored, split)
            skills[split][skill] += 1
            if writer.documents == docs_per_shard:
                shards.append(writer.finish())
                finished.append(writer)
                writer = None
        if writer is not None:
            shards.append(writer.finish())
            finished.append(writer)
            writer = None
        if not shards:
            raise DataError(f"none of the {sum(skips.counts.values())} records of {len(files)} file(s) could be "
                            f"stored ({_reasons(skips.counts)}); nothing was written")
        sidecar = {
            "format": FORMAT,
            "tokenizer": {"fingerprint": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size},
            "dtype": np.dtype(dtype).name,
            "shards": shards,
            "documents": sum(s["documents"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "skills": {split: dict(sorted(counts.items())) for split, counts in skills.items()},
            "skipped": dict(sorted(skips.counts.items())),
            "skip_examples": dict(sorted(skips.examples.items())),
            "inputs": [str(f) for f in files],
        }
        _commit(out, finished, tokenizer, sidecar)
        return sidecar
    finally:  # an interrupted write leaves no temporary file behind
        for w in [*finished, *([writer] if writer else [])]:
            for temp in shard_files(w.temp):
                temp.unlink(missing_ok=True)


CHUNK_LINES = 256  # lines per task: enough to amortize passing them between processes
_worker_tokenizer: ScientificTokenizer | None = None


def _stored_documents(lines: Iterable[tuple[str, Path, bytes]], tokenizer: ScientificTokenizer, tokenizer_path: Path,
                      workers: int) -> Iterator[tuple]:
    """(where, (id, source, skill, StoredDocument) or None, skip reason or None) per line, in input order."""
    chunks = iter(lambda: list(islice(lines, CHUNK_LINES)), [])
    if workers == 1:
        results: Iterable[list] = (_store_chunk(chunk, tokenizer) for chunk in chunks)
    else:
        results = _in_workers(chunks, tokenizer_path, workers)
    for result in results:
        yield from result


def _in_workers(chunks: Iterator[list], tokenizer_path: Path, workers: int) -> Iterator[list]:
    """Pool.imap would read the whole input ahead of the workers; at most 2 chunks per worker are in
    flight here, so memory stays flat however large the corpus. Spawned, not forked: the parent has
    torch's and the tokenizer's threads running."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_load_worker_tokenizer, initargs=(tokenizer_path,)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_store_chunk, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _load_worker_tokenizer(path: Path) -> None:
    global _worker_tokenizer
    _worker_tokenizer = ScientificTokenizer.load(path)


def _store_chunk(chunk: list[tuple[str, Path, bytes]], tokenizer: ScientificTokenizer | None = None) -> list[tuple]:
    tokenizer = tokenizer or _worker_tokenizer
    out = []
    for where, base_dir, raw in chunk:
        try:
            doc = parse_line(raw)
            out.append((where, (doc.id, doc.source, doc.skill, stored_document(doc, tokenizer, base_dir)), None))
        except DocumentFormatError as err:
            out.append((where, None, err.reason))
    return out


def _lines(files: list[Path], skips: _Skips):
    """(where, the directory figure paths start from, line bytes) of every non-blank line; a damaged
    file is one counted skip, as in training."""
    for path in files:
        try:
            for lineno, raw in read_lines(path):
                if raw.strip():
                    yield f"{path}:{lineno}", path.parent, raw
        except DamagedFileError as err:
            skips.add(err.reason, f"{path}:{err.last_line + 1}")


def _commit(out: Path, finished: list[_ShardWriter], tokenizer: ScientificTokenizer, sidecar: dict) -> None:
    """The old sidecar goes first, so the old dataset stops being one before its files are replaced."""
    final = sidecar_path(out)
    final.unlink(missing_ok=True)
    for writer in finished:
        writer.commit()
    staging = out.with_name(f"{out.name}.tokenizer.tmp-{os.getpid()}")
    tokenizer.save(staging)
    swap_in(staging, tokenizer_dir(final))
    temp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    temp.write_text(json.dumps(sidecar, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temp, final)


def _reasons(counts: Counter) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in counts.most_common()) or "no records"
