"""Batches made ahead of the training step, by a PackedLoader in a worker process.

The worker runs the same loader the training thread would (one sequence of batches, the same for
any timing) and sends each batch with the loader's state right after it. The training process
keeps the state of the last batch it handed out, so `state_dict()` describes the loader after
that batch, never after the ones still queued, and a resume continues exactly. A process rather
than a thread: featurizing is Python work, which in a thread would hold the interpreter lock
against the training loop's own Python (bench/data.py measures both).

The worker starts at once (its imports overlap the trainer's set-up) and waits to be told where
to begin: at the start, or at a loaded state. An error in the worker reaches the caller of the
call that would have raised it in the training thread, as the same exception: the same one line
for a scifm error. The worker ignores the signals the training process acts on (Ctrl-C,
pre-emption's USR1 and TERM), is killed by `close()`, and leaves by itself once the training
process has gone (a `kill -9` included).

Batches travel through a one-way pipe whose writing end only the worker holds, with a semaphore
of data.prefetch_batches slots for the bound. Not a multiprocessing.Queue: its pipe's writing end
stays open in the training process too, so a worker killed halfway through writing a batch (the
kernel's out-of-memory killer) would leave the reader waiting forever for the rest of the message;
here the reader sees the end of the pipe and names the dead worker. Commands go the other way
through a pipe of their own, for the same reason.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import signal
import traceback
import weakref
from typing import NoReturn

import torch

from scifm.core.errors import DataError, ScifmError
from scifm.core.python_gc import freeze_set_up_objects
from scifm.data.config import DataConfig
from scifm.data.loader import PackedLoader, source_file_sizes
from scifm.data.packing import Batch
from scifm.data.skips import SkipCounter
from scifm.data.streams import SourceSpec

# how often a blocked side looks whether the other one is still there
LIVENESS_CHECK_S = 1.0


def training_loader(cfg: DataConfig, specs: list[SourceSpec], tokenizer, enc_cfg, **kw) -> PackedLoader | PrefetchingLoader:
    """The training split's loader: prefetching unless data.prefetch_batches is 0."""
    if cfg.prefetch_batches == 0:
        return PackedLoader(cfg, specs, tokenizer, enc_cfg, split="train", **kw)
    return PrefetchingLoader(cfg, specs, tokenizer, enc_cfg, split="train", **kw)


class PrefetchingLoader:
    """PackedLoader's interface (next_batch, state_dict, load_state_dict, the token and skip counts,
    close), with up to data.prefetch_batches batches made ahead in a worker process."""

    def __init__(self, cfg: DataConfig, specs: list[SourceSpec], tokenizer, enc_cfg, *, split: str,
                 batch_size: int, seed: int, dp_rank: int = 0, dp_size: int = 1):
        self.cfg, self.specs, self.split = cfg, specs, split
        self._args = (cfg, specs, tokenizer, enc_cfg, dict(split=split, batch_size=batch_size, seed=seed,
                                                          dp_rank=dp_rank, dp_size=dp_size))
        self._position: dict | None = None  # the loader's state after the last batch handed out
        self._spawn()

    def _spawn(self) -> None:
        context = mp.get_context("spawn")  # forking a process with torch's threads running is unsafe
        commands_in, self._commands = context.Pipe(duplex=False)
        self._batches, batches_out = context.Pipe(duplex=False)
        # batches sent and not yet received (one where a caller builds this loader with 0)
        self._slots = context.Semaphore(max(1, self.cfg.prefetch_batches))
        self._process = context.Process(target=_work, args=(*self._args, commands_in, batches_out, self._slots),
                                        name=f"scifm-data-{self.split}", daemon=True)
        self._process.start()
        commands_in.close()  # the worker's ends only: each pipe ends where its one writer or reader dies
        batches_out.close()
        # kills the worker when this loader is collected or the interpreter exits (before multiprocessing's
        # own exit handler, which would wait for a worker that ignores its TERM)
        self._stop = weakref.finalize(self, _kill, self._process, self._commands, self._batches)
        self._started = False

    def _begin(self, state: dict | None) -> None:
        """Tells the worker where to begin (a fresh one if this one has begun) and waits until it is there."""
        if self._started:
            self.close()
            self._spawn()
        try:
            self._commands.send_bytes(pickle.dumps(state))
        except OSError:  # a broken pipe: the worker is gone
            self._worker_stopped()
        self._started = True
        _, self._position = self._receive()

    def _receive(self) -> tuple:
        while not self._batches.poll(LIVENESS_CHECK_S):
            if not self._process.is_alive():
                self._worker_stopped()
        try:
            kind, *item = pickle.loads(self._batches.recv_bytes())
        except (EOFError, OSError):  # the pipe's end, maybe halfway through a batch
            self._worker_stopped()
        self._slots.release()
        if kind == "error":
            self.close()
            raise item[0]
        return item

    def _worker_stopped(self) -> NoReturn:
        self._process.join(LIVENESS_CHECK_S)  # its exit code, once the kernel has reaped it
        raise DataError(f"the data loader's worker process stopped (exit code {self._process.exitcode}) "
                        "without a word; was it killed, e.g. for lack of memory?") from None

    # --- PackedLoader's interface ---------------------------------------------------------------
    def next_batch(self) -> Batch:
        if not self._started:
            self._begin(None)
        batch, self._position = self._receive()
        return batch

    def state_dict(self) -> dict:
        return {**self._last_position(), "files": source_file_sizes(self.specs)}

    def _last_position(self) -> dict:
        """The loader's position after the last batch handed out (the counters read it every log
        step: without state_dict's stat of every source file)."""
        if not self._started:
            self._begin(None)
        return self._position

    def load_state_dict(self, state: dict) -> None:
        self._begin(state)

    @property
    def tokens_by_source(self) -> dict[str, int]:
        return dict(self._last_position()["tokens_by_source"])

    @property
    def tokens_by_skill(self) -> dict[str, int]:
        return dict(self._last_position()["tokens_by_skill"])

    @property
    def skips(self) -> SkipCounter:
        counter = SkipCounter(self.cfg.max_bad_fraction, split=self.split)
        counter.load_state_dict(self._last_position()["skips"])
        return counter

    def close(self) -> None:
        self._stop()


def _kill(process, *pipes) -> None:
    if process.is_alive():
        process.kill()  # it ignores TERM (see the module docstring)
    process.join()
    for pipe in pipes:
        pipe.close()


def _work(cfg, specs, tokenizer, enc_cfg, kw, commands, batches, slots) -> None:
    """The worker: build the loader, wait for where to begin, then make batches until stopped."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    torch.set_num_threads(1)  # collate's tensors are small; the cores belong to training
    parent = mp.parent_process()
    try:
        loader = PackedLoader(cfg, specs, tokenizer, enc_cfg, **kw)
        freeze_set_up_objects()  # its batches make objects by the thousand (core/python_gc.py)
        try:  # the end of the pipe: the training process is gone before it said where to begin
            state = pickle.loads(commands.recv_bytes())
        except EOFError:
            return
        if state is not None:
            loader.load_state_dict(state)
        item = ("ready", None, loader.position_state())
        while _send(batches, slots, item, parent):
            item = ("batch", loader.next_batch(), loader.position_state())
    except BaseException as err:  # every error goes to the training process, which raises it
        _send(batches, slots, ("error", _portable(err)), parent)


def _send(batches, slots, item, parent) -> bool:
    """Sends `item` once a slot is free; False once the training process has gone (then nothing
    waits for it).

    Pickled by value, tensors included: torch's multiprocessing pickler would share them as file
    descriptors that only this process can hand over, and batches sent before an error would be
    lost with it when it leaves."""
    data = pickle.dumps(item)
    while not slots.acquire(timeout=LIVENESS_CHECK_S):
        if not parent.is_alive():
            return False
    try:
        batches.send_bytes(data)
    except OSError:  # a broken pipe: the training process is gone
        return False
    return True


def _portable(err: BaseException) -> BaseException:
    """`err` as the training process can receive it: itself where it pickles (a scifm error, or the
    KeyError a damaged state raises, which the trainer names), with the worker's traceback as a note
    where it is not a scifm error; else a DataError with its message."""
    if not isinstance(err, ScifmError):
        err.add_note("in the data loader's worker process:\n" + "".join(traceback.format_exception(err)).rstrip())
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return DataError(str(err))
