"""The sharded data path: each rank featurizes only its own rows, batches are made ahead in a worker
process, and neither changes a batch, a skip count or a resume."""

from __future__ import annotations

import bisect
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SMALL_CORPUS_DOCS
from scifm.core.errors import BadFractionExceeded, DataError
from scifm.data.features import PADDED_GROUPS, Prepared
from scifm.data.loader import PackedLoader
from scifm.data.prefetch import PrefetchingLoader, training_loader
from scifm.data.streams import resolve_sources
from tests.test_data_pipeline import text_doc

SEQ_LEN = 64  # short rows: documents are split across rows, so chunks stay pending between batches
BATCH = 4


def loader(cfg, tokenizer, dp_rank=0, dp_size=1, cls=PackedLoader):
    return cls(cfg.data, resolve_sources(cfg.data), tokenizer, cfg.model.encoders, split="train",
               batch_size=BATCH, seed=0, dp_rank=dp_rank, dp_size=dp_size)


def item_features(modality: str, feats: dict, i: int) -> dict:
    """Item i's feature arrays out of its modality's batch: its padded row without the padding, or,
    for figures (packed several to a row), the positions that hold figure i."""
    if modality == "figure":
        mine = feats["patch_figure"] == i
        return {"patches": feats["patches"][mine], "patch_pos": feats["patch_pos"][mine]}
    return {key: feats[key][i][feats[mask][i]] for mask, keys in PADDED_GROUPS[modality].items() for key in keys}


def rows_of(batch) -> list[dict]:
    """Each row of a batch on its own: its [S] tensors, its chunks' tags, and its items (modality,
    slot positions within the row, each feature array without padding) in the row's order. Rows compare alike
    whichever batch (rank) they were collated in, since padding depends on the batch."""
    seq_len = batch.input_ids.shape[1]
    rows = [{"tensors": [batch.input_ids[b], batch.labels[b], batch.positions[b], batch.doc_ids[b]],
             "tags": batch.chunk_tags[b], "items": []} for b in range(batch.input_ids.shape[0])]
    for modality, slots in batch.slot_index.items():
        feats = batch.items[modality]
        for i in range(slots.shape[0]):  # a placeholder item has no slots, so it is not listed
            item = (modality, slots[i] % seq_len, item_features(modality, feats, i))
            rows[int(slots[i, 0]) // seq_len]["items"].append(item)
    for row in rows:  # in the row's order (a batch lists its modalities in the order they first occur)
        row["items"].sort(key=lambda item: int(item[1][0]))
    return rows


def same_rows(a: list[dict], b: list[dict]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x["tags"] != y["tags"] or not all(torch.equal(s, t) for s, t in zip(x["tensors"], y["tensors"])):
            return False
        if [(m, s.tolist()) for m, s, _ in x["items"]] != [(m, s.tolist()) for m, s, _ in y["items"]]:
            return False
        for (_, _, fx), (_, _, fy) in zip(x["items"], y["items"]):
            if fx.keys() != fy.keys() or not all(torch.equal(fx[k], fy[k]) for k in fx):
                return False
    return True


def test_mixture_draws_are_generator_choice_draws():
    """The loader's draw (one uniform found in the normalised cumulative sum) is the draw
    Generator.choice(p=...) makes, so the document sequence is the one choice gave."""
    probs = np.array([0.05, 0.3, 0.15, 0.5, 1e-9])
    probs = probs / probs.sum()
    cdf = (np.cumsum(probs) / np.cumsum(probs)[-1]).tolist()
    a, b = np.random.Generator(np.random.PCG64(3)), np.random.Generator(np.random.PCG64(3))
    assert [int(a.choice(len(probs), p=probs)) for _ in range(20000)] == \
           [bisect.bisect_right(cdf, b.random()) for _ in range(20000)]


def test_ranks_batches_are_the_single_process_rows_with_and_without_prefetch(tokenizer, make_config):
    """dp = 1, 2, 4 (rank 1 of 2 through the worker process): every rank's rows, with every field and
    every item's features, are the single-process batch's rows rank, rank + dp, ..."""
    cfg = make_config(f"data.seq_len={SEQ_LEN}")
    whole = loader(cfg, tokenizer)
    expected = [rows_of(whole.next_batch()) for _ in range(3)]
    for dp in (2, 4):
        for rank in range(dp):
            part = loader(cfg, tokenizer, rank, dp)
            for rows in expected:
                assert same_rows(rows_of(part.next_batch()), rows[rank::dp]), (dp, rank)
    prefetching = loader(cfg, tokenizer, 1, 2, PrefetchingLoader)
    try:
        for rows in expected:
            assert same_rows(rows_of(prefetching.next_batch()), rows[1::2])
    finally:
        prefetching.close()
    assert prefetching.skips.as_dict() == whole.skips.as_dict()
    assert prefetching.tokens_by_skill == dict(whole.tokens_by_skill)


def test_each_item_is_featurized_by_the_one_rank_that_keeps_it(tokenizer, make_config, monkeypatch):
    """Features are computed only for a rank's own rows (each item once over the ranks, so a rank's
    share falls as 1/dp), while every rank makes the checks of every document, so skips and rows are
    the same on every rank."""
    cfg = make_config(f"data.seq_len={SEQ_LEN}")
    featurized = []
    original = Prepared.features
    monkeypatch.setattr(Prepared, "features", lambda self: featurized.append(1) or original(self))

    def count(rank, dp):
        ld = loader(cfg, tokenizer, rank, dp)
        featurized.clear()  # not the placeholder items, featurized once as the loader is made
        batches = [ld.next_batch() for _ in range(4)]
        n_items = sum(int(b.slot_index[m].shape[0]) for b in batches for m in b.slot_index)
        return len(featurized), n_items, ld.skips.as_dict()

    single, single_items, single_skips = count(0, 1)
    assert single == single_items > 0
    for dp in (2, 4):
        counts = [count(rank, dp) for rank in range(dp)]
        assert all(n == items for n, items, _ in counts)  # only what the rank keeps
        assert sum(n for n, _, _ in counts) == single  # each item once over the ranks
        assert all(skips == single_skips for _, _, skips in counts)


def test_prefetched_state_is_the_state_after_the_last_batch_handed_out(tokenizer, make_config):
    """After k batches the worker has made more, yet state_dict() is the single-threaded loader's
    after k, and a loader resumed from it (through JSON) gives exactly the next batches."""
    cfg = make_config(f"data.seq_len={SEQ_LEN}")
    ahead, plain = loader(cfg, tokenizer, cls=PrefetchingLoader), loader(cfg, tokenizer)
    resumed = loader(cfg, tokenizer, cls=PrefetchingLoader)
    try:
        for _ in range(3):
            assert same_rows(rows_of(ahead.next_batch()), rows_of(plain.next_batch()))
        state = ahead.state_dict()
        assert state == plain.state_dict()
        resumed.load_state_dict(json.loads(json.dumps(state)))
        for _ in range(3):
            want = rows_of(plain.next_batch())
            assert same_rows(rows_of(resumed.next_batch()), want)
            assert same_rows(rows_of(ahead.next_batch()), want)
        assert resumed.state_dict() == plain.state_dict()
    finally:
        ahead.close()
        resumed.close()


def test_an_error_in_the_worker_is_the_same_one_line_error_at_the_same_batch(tokenizer, make_config, tmp_path):
    """A source past its bad-record budget stops the worker; the training process raises the same
    error, with the same one-line message, at the batch the single-threaded loader raises it."""
    docs = [text_doc(i, source="u") for i in range(120)]
    bad = {"id": "bad", "source": "u", "skill": "prose", "segments": [{"type": "molecule", "smiles": "C1CC"}]}
    lines = [json.dumps(d) for d in docs[:60]] + [json.dumps({**bad, "id": f"bad-{i}"}) for i in range(60)]
    path = tmp_path / "u.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = make_config(f"data.seq_len={SEQ_LEN}", f"data.sources=[{{path:{path}}}]", "data.max_bad_fraction=0.2")

    def failure(ld):
        for n in range(100):
            try:
                ld.next_batch()
            except BadFractionExceeded as err:
                return n, str(err)
        pytest.fail("no BadFractionExceeded in 100 batches")

    want = failure(loader(cfg, tokenizer))
    ahead = loader(cfg, tokenizer, cls=PrefetchingLoader)
    try:
        assert failure(ahead) == want
    finally:
        ahead.close()
    assert "\n" not in want[1] and "source 'u'" in want[1]


def test_prefetch_batches_zero_keeps_the_loader_on_the_training_thread(tokenizer, make_config):
    cfg = make_config("data.prefetch_batches=0")
    ld = training_loader(cfg.data, resolve_sources(cfg.data), tokenizer, cfg.model.encoders, batch_size=BATCH, seed=0)
    assert type(ld) is PackedLoader


def _threads_writing_a_pipe(pid: int) -> int:
    """How many of the process's threads wait in the kernel for room in a pipe (Linux's wchan)."""
    tasks = f"/proc/{pid}/task"
    return sum("pipe_write" in Path(tasks, tid, "wchan").read_text() for tid in os.listdir(tasks))


def test_a_worker_killed_halfway_through_a_batch_is_named_in_one_line(tokenizer, make_config):
    """The kernel's out-of-memory killer can stop the worker in the middle of writing a batch. The
    training process must then name the dead worker, not wait forever for the rest of the batch (as it
    did when batches went through a multiprocessing.Queue, whose pipe the reader also held open)."""
    # a batch's token ids alone (4 x 4096 x 8 bytes) overflow a pipe's 64 KiB
    cfg = make_config("data.seq_len=4096", "data.prefetch_batches=2")
    ahead = loader(cfg, tokenizer, cls=PrefetchingLoader)
    ahead.next_batch()
    deadline = time.monotonic() + 60
    while not _threads_writing_a_pipe(ahead._process.pid):  # the next batch, half written
        assert time.monotonic() < deadline, "the worker never blocked writing a batch"
        time.sleep(0.05)
    ahead._process.kill()
    ahead._process.join()

    raised: list[BaseException] = []

    def read_on():
        try:
            for _ in range(2 * cfg.data.prefetch_batches + 2):
                ahead.next_batch()
        except BaseException as err:
            raised.append(err)

    reader = threading.Thread(target=read_on, daemon=True)  # a daemon: a hang must not hold pytest
    reader.start()
    reader.join(30)
    assert not reader.is_alive(), "next_batch() still waits 30 s after its worker died"
    assert len(raised) == 1 and isinstance(raised[0], DataError), raised
    assert "worker process stopped" in str(raised[0]) and "\n" not in str(raised[0])


ORPHAN = """
import sys, time
from scifm.config import compose_run_config
from scifm.data.prefetch import PrefetchingLoader
from scifm.data.streams import resolve_sources
from scifm.tokenizers import ScientificTokenizer
cfg = compose_run_config(["experiment=tiny", *sys.argv[2:]])
ld = PrefetchingLoader(cfg.data, resolve_sources(cfg.data), ScientificTokenizer.load(sys.argv[1]), cfg.model.encoders,
                       split="train", batch_size=4, seed=0)
ld.next_batch()
print(ld._process.pid, flush=True)
time.sleep(600)
"""


def test_the_worker_leaves_when_the_training_process_is_killed(tokenizer, corpus_dir, tmp_path):
    """kill -9 of the training process (the kill tests' fault) leaves no worker behind."""
    tokenizer.save(tmp_path / "tok")
    child = subprocess.Popen([sys.executable, "-c", ORPHAN, str(tmp_path / "tok"), f"data.corpus_dir={corpus_dir}",
                              f"data.corpus_max_docs_per_source={SMALL_CORPUS_DOCS}", f"data.seq_len={SEQ_LEN}",
                              "data.prefetch_batches=2"],
                             stdout=subprocess.PIPE, text=True)
    worker = int(child.stdout.readline())
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    deadline = time.monotonic() + 30  # it notices within a second of waiting on a full queue
    while time.monotonic() < deadline and _running(worker):
        time.sleep(0.2)
    assert not _running(worker)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit is reaped by whoever adopted it)."""
    try:
        status = open(f"/proc/{pid}/status").read()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status
