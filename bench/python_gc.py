"""The data loader with the set-up's objects frozen out of Python's cycle collector (what the trainer
and the data worker do: scifm/core/python_gc.py) against leaving them in, in separate processes (the
collector's state belongs to a whole process), alternated round by round so that load on the machine
hits both alike. Each process is as a data worker: torch, scifm's data path and a PackedLoader at dp=1;
after warm-up batches it times --batches more in the thread's CPU time, all together (a full pass of
the collector comes every so many batches, so a per-batch median would hide it), and counts the
collector's full passes and their time. Two settings of bench/data.py: the tiny model's (the
built-in corpus, JSONL) and moe_1b's on indexed datasets of the built-in sources (short documents,
the most objects per token). Printed: medians over rounds, spreads (max / min over rounds), and
frozen / default.
Run: python bench/python_gc.py [--rounds 3] [--batches 40]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("default", "frozen")
WARMUP = 2


def child(mode: str, setting: str, overrides: list[str], tokenizer_dir: str, batches: int) -> None:
    from scifm.config import compose_run_config
    from scifm.core.python_gc import freeze_set_up_objects
    from scifm.data.loader import PackedLoader
    from scifm.data.streams import resolve_sources
    from scifm.tokenizers import ScientificTokenizer

    cfg = compose_run_config(overrides)
    loader = PackedLoader(cfg.data, resolve_sources(cfg.data), ScientificTokenizer.load(Path(tokenizer_dir)),
                          cfg.model.encoders, split="train", batch_size=cfg.trainer.batch_size, seed=cfg.trainer.seed)
    for _ in range(WARMUP):
        loader.next_batch()
    tracked = len(gc.get_objects())
    if mode == "frozen":
        freeze_set_up_objects()
    passes, started = [], {}
    gc.callbacks.append(lambda phase, info: info["generation"] == 2 and (
        started.update(t=time.perf_counter()) if phase == "start" else passes.append(time.perf_counter() - started["t"])))
    t0 = time.thread_time()
    for _ in range(batches):
        loader.next_batch()
    seconds = (time.thread_time() - t0) / batches
    print(json.dumps({"seconds": seconds, "passes": len(passes), "pass_seconds": sum(passes), "tracked": tracked}))


def settings(tmp: Path) -> tuple[dict[str, list[str]], Path]:
    """Each setting's name and config overrides, and the tokenizer (trained on the built-in corpus, as
    bench/data.py's)."""
    from data import SETTINGS, SOURCES, indexed_sources

    from scifm.config import compose_run_config
    from scifm.data.streams import resolve_sources
    from scifm.data.tokenizer_training import train_tokenizer

    tiny = compose_run_config(["experiment=tiny"])
    specs = resolve_sources(tiny.data)
    tokenizer = train_tokenizer(specs, tiny.data)
    indexed = indexed_sources(specs, tokenizer, tmp)[1, "indexed"]
    preset, rows, seq = SETTINGS["moe_1b"]
    return {"tiny, JSONL": ["experiment=tiny"],
            SOURCES[1, "indexed"]: ["experiment=tiny", f"model={preset}", f"trainer.batch_size={rows}", f"data.seq_len={seq}",
                          f"data.sources={indexed}"]}, tmp / "tokenizer"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--child", nargs=3, metavar=("MODE", "SETTING", "TOKENIZER"), help=argparse.SUPPRESS)
    parser.add_argument("--overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child[:2], args.overrides, args.child[2], args.batches)
        return
    with tempfile.TemporaryDirectory() as tmp:
        overrides, tokenizer_dir = settings(Path(tmp))
        runs = {(s, m): [] for s in overrides for m in MODES}
        for _ in range(args.rounds):
            for setting, mode in runs:
                out = subprocess.run([sys.executable, __file__, "--child", mode, setting, str(tokenizer_dir),
                                      "--batches", str(args.batches), "--overrides", *overrides[setting]],
                                     capture_output=True, text=True, check=True)
                runs[setting, mode].append(json.loads(out.stdout.splitlines()[-1]))
    print(f"{args.rounds} rounds of {args.batches} batches after {WARMUP} of warm-up, one process each, dp=1; "
          "CPU time of the loader's thread per batch")
    for setting in overrides:
        medians = {}
        for mode in MODES:
            rs = runs[setting, mode]
            seconds = [r["seconds"] for r in rs]
            medians[mode] = statistics.median(seconds)
            print(f"  {setting}, {mode:7s}: {medians[mode] * 1e3:7.1f} ms/batch  spread {max(seconds) / min(seconds):4.2f}"
                  f"  full passes {statistics.median(r['passes'] for r in rs):4.0f} taking "
                  f"{statistics.median(r['pass_seconds'] for r in rs):6.3f} s  ({statistics.median(r['tracked'] for r in rs):,.0f} "
                  "objects tracked at set-up)")
        print(f"  {setting}: frozen / default {medians['frozen'] / medians['default']:.2f}")


if __name__ == "__main__":
    main()
