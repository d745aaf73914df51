"""`scifm data tokenize` at growing corpus sizes: rate and peak memory side by side in one run.

Writes synthetic JSONL corpora of the given sizes from the built-in corpus's token-based documents
(text, LaTeX, molecules, proteins; copies get fresh ids, so they land in every split), then tokenizes
each in a fresh process with one worker per CPU and prints its rate (input MB/s) and peak RSS (the
writing process, and the largest worker). Memory is bounded when the
peak stays flat as the input grows (the writer streams lines in and ids out; what grows with the
corpus is Megatron's per-document index, 8 bytes a document plus one small metadata record, and the
packing index's row of the shard being written, 48 bytes a document).
Run: python bench/tokenize_scale.py [SIZE_MB ...]   (default: 64 1024; SCIFM_BENCH_WORKERS=N to set workers)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scifm.config import compose_run_config
from scifm.data.documents import read_lines
from scifm.data.streams import resolve_sources
from scifm.data.tokenizer_training import train_tokenizer

TOKEN_BASED = {"text", "latex", "molecule", "protein"}

# run in a fresh interpreter, so its peak RSS is the tokenize command's alone
CHILD = """
import resource, sys, time
from pathlib import Path
from scifm.data.indexed.write import tokenize_corpus
t0 = time.perf_counter()
meta = tokenize_corpus([sys.argv[1]], Path(sys.argv[2]), Path(sys.argv[3]), docs_per_shard=int(sys.argv[4]),
                       workers=int(sys.argv[5]))
peaks = [resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
print(time.perf_counter() - t0, meta["documents"], meta["tokens"], *peaks)
"""


def seed_lines(cfg) -> list[dict]:
    docs = []
    for path in (f for spec in resolve_sources(cfg.data) for f in spec.files):
        for _, raw in read_lines(path):
            doc = json.loads(raw)
            if all(seg["type"] in TOKEN_BASED for seg in doc["segments"]):
                docs.append(doc)
    return docs


def write_corpus(path: Path, docs: list[dict], size_bytes: int) -> int:
    written = copy = 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < size_bytes:
            for doc in docs:
                line = json.dumps(dict(doc, id=f"{doc['id']}#{copy}"), ensure_ascii=False) + "\n"
                fh.write(line)
                written += len(line.encode("utf-8"))
                if written >= size_bytes:
                    break
            copy += 1
    return written


def main() -> None:
    sizes_mb = [float(arg) for arg in sys.argv[1:]] or [64.0, 1024.0]
    workers = int(os.environ.get("SCIFM_BENCH_WORKERS", len(os.sched_getaffinity(0))))
    cfg = compose_run_config(["experiment=tiny"])
    docs = seed_lines(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = train_tokenizer(resolve_sources(cfg.data), cfg.data)
        tokenizer.save(root / "tokenizer")
        rows = []
        for size_mb in sizes_mb:
            corpus = root / f"corpus-{size_mb:g}.jsonl"
            n_bytes = write_corpus(corpus, docs, int(size_mb * 2**20))
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", CHILD, str(corpus), str(root / "tokenizer"),
                                  str(root / f"indexed-{size_mb:g}" / "corpus"), "100000", str(workers)],
                                 capture_output=True, text=True, check=True)
            seconds, n_docs, n_tokens, writer_kb, worker_kb = out.stdout.split()
            rows.append((n_bytes / 2**20, int(writer_kb) / 1024, int(worker_kb) / 1024))
            corpus.unlink()
            print(f"{n_bytes / 2**20:8.0f} MB  {int(n_docs):>9} docs  {int(n_tokens):>11} tokens  "
                  f"{workers} workers {n_bytes / 2**20 / float(seconds):6.2f} MB/s  peak RSS: writer "
                  f"{int(writer_kb) / 1024:5.0f} MB, worker {int(worker_kb) / 1024:5.0f} MB  "
                  f"(process {time.perf_counter() - t0:.0f} s)", flush=True)
    (small_mb, small_writer, small_worker), (large_mb, large_writer, large_worker) = rows[0], rows[-1]
    print(f"input x{large_mb / small_mb:.1f} -> peak RSS x{large_writer / small_writer:.2f} (writer), "
          f"x{large_worker / small_worker:.2f} (worker)")


if __name__ == "__main__":
    main()
