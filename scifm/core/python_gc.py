"""What a process made at set-up is kept out of the walks of Python's cycle collector.

A training process holds hundreds of thousands of tracked Python objects from its set-up (about
480,000 in bench/data.py's: the modules torch, RDKit and Megatron import, the model, the tokenizer's
tables), and the collector's full pass walks every one. The data path makes a few short-lived
containers per document, which start such a pass every few batches: 0.2 s each there, several
times the time the loader spends on the documents themselves. gc.freeze() moves the objects that
exist now into a generation the collector no longer walks; reference counting still frees them,
only a reference cycle among them would stay (so the collector runs once first).
`python bench/data.py` prints next_batch's time with the set-up objects frozen and not.
"""

from __future__ import annotations

import gc


def freeze_set_up_objects() -> int:
    """Collects once, then freezes every tracked object; returns how many are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
