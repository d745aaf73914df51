"""The data path's rate per process against what a training step consumes, in one run.

1. Featurize + pack: documents/s and tokens/s of one rank's PackedLoader.next_batch (mixture draws,
   reading, token ids and checks of every document, packing of the global rows, features and collate
   of this rank's rows) for dp = 1, 2, 4, 8 (rank 0 of dp ranks, in this process), on the built-in
   corpus, for the tiny model's data settings and for moe_1b's (its encoders' slots, rows of 4096).
   Times are the measuring thread's CPU seconds (torch on one thread; the thread that makes batches
   ahead in part 3 is not counted): the rate of one dedicated core, which
   other load on a shared machine changes less than wall time. Tokens are row positions (B x S), as
   the step consumes them. Also printed: the items featurized per batch (falls as 1/dp) and each
   dp's time over dp=1's, and the part of it that every rank spends alike whatever dp is: drawing,
   reading what packing needs and packing the global rows (PackedLoader.next_rows keeping none of
   them, timed on its own in the same rounds), which bounds how far a rank's time can fall with dp.
   moe_1b's settings also run on indexed datasets that `scifm data tokenize` wrote of the built-in
   sources (in a temporary directory, first; tables and figures included); those documents are
   short, so the sources are also joined 64 documents at a time into paper-length ones, read from
   JSONL and from indexed datasets.
2. Consumption: the tiny model's training step (forward, backward, AdamW; fp32, one thread) timed on
   this CPU in the same rounds; moe_1b's from its FLOPs per token at an assumed MFU of an assumed GPU
   peak (printed; --mfu, --peak-tflops). Ratio = data tokens/s / consumed tokens/s, per rank.
3. Prefetch: the tiny step fed by batches made on the training thread, by a thread making them ahead,
   and by the worker process of data.prefetch_batches: wall time per step (what overlap gains, where
   a core is free for it) and the training thread's CPU time in next_batch (what it still pays).
4. Featurize threads: moe_1b's settings on the built-in sources' indexed datasets (figures are most
   of the featurizing there) with data.featurize_threads = 1 and each of --featurize-threads, at dp = 1 and
   8: wall time per batch (the pool's threads are not the measuring thread, so its CPU time would
   leave them out), the ratio to one thread and the rate against the consumption. Run where as many
   cores are idle as there are threads.
5. Sending a batch: moe_1b's indexed batches at dp = 1 pickled and unpickled as the data worker and
   the training process do (scifm.data.prefetch), against the same batches with their figures'
   patches as float32 in [0, 1] (as the loader made them before it kept bytes): megabytes per batch
   and the CPU time of each side, alternated batch by batch.
6. Figure resolution: moe_1b's indexed batches (part 1's) against the same batches with every figure
   enlarged to max_side (model.encoders.figure.upscale=true, as the loader made them before; the
   built-in figures are at most 256 pixels, moe_1b's side 448), at dp = 1 and 8: CPU time per batch,
   the ratio taken round by round, and the patches per batch (real ones, and the positions of the
   rows they are packed in, which the figure encoder runs over).
As the trainer and the data worker do, the set-up's objects are frozen out of Python's cycle
collector (scifm/core/python_gc.py) before anything is timed (bench/python_gc.py measures that).

Variants alternate within every round, so that load on the machine hits them alike; medians and
the spread (max / min over rounds) are printed.

  python bench/data.py [--rounds 5] [--corpus-docs 0] [--featurize-threads 2 [4 ...]]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import queue
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from scifm.config import compose_run_config
from scifm.core.device import autocast_for
from scifm.core.errors import DataError
from scifm.core.python_gc import freeze_set_up_objects
from scifm.data.config import DataConfig
from scifm.data.indexed.write import tokenize_corpus
from scifm.data.loader import PackedLoader
from scifm.data.prefetch import PrefetchingLoader
from scifm.data.streams import resolve_sources
from scifm.data.tokenizer_training import train_tokenizer
from scifm.model.init import init_parameters
from scifm.model.multimodal import ScientificMoE, vocab_sizes_of
from scifm.model.transformer import count_params, moe_layers
from scifm.parallel.config import ParallelConfig
from scifm.parallel.dims import ParallelDims
from scifm.parallel.distributed import DistContext
from scifm.parallel.parallelize import parallelize
from scifm.train.optim import build_optimizer, build_scheduler
from scifm.train.step import apply_update, scaled_cross_entropy, train_step

DP_SIZES = (1, 2, 4, 8)
# (model preset, rows per global batch, data.seq_len): tiny as experiment=tiny trains; moe_1b with
# rows of its max_seq_len and one row per rank at dp=8
SETTINGS = {"tiny": ("tiny", 16, 256), "moe_1b": ("moe_1b", 8, 4096)}
# documents of the built-in sources are short (about 50 tokens); papers run to thousands, so they are
# also read joined JOIN at a time (their segments in order, as one document of ~2,600 tokens)
JOIN = 64
# moe_1b's settings on the built-in sources, besides the JSONL files as they are (SETTINGS' moe_1b)
SOURCES = {(join, kind): f"moe_1b, built-in sources{f' joined {join} per document' if join > 1 else ''}, {kind}"
           for join, kind in ((1, "indexed"), (JOIN, "JSONL"), (JOIN, "indexed"))}


def indexed_sources(specs, tokenizer, out: Path) -> dict[tuple[int, str], str]:
    """data.sources of the built-in sources (SOURCES' keys): indexed datasets written here, and JSONL
    files and indexed datasets of them joined JOIN documents at a time. Every document is stored, so
    each holds what its JSONL file holds."""
    tokenizer.save(out / "tokenizer")
    sources: dict[tuple[int, str], list[str]] = {key: [] for key in SOURCES}
    for spec in specs:
        (path,) = spec.files
        for join in (1, JOIN):
            if join > 1:
                path = joined(path, out / f"{spec.name}-joined.jsonl", join)
                sources[join, "JSONL"].append(f"{{path:{path},name:{spec.name},weight:{spec.weight}}}")
            prefix = out / f"{spec.name}-{join}"
            sidecar = tokenize_corpus([str(path)], out / "tokenizer", prefix, workers=2)
            if sidecar["skipped"]:
                raise DataError(f"{path}: `scifm data tokenize` skipped {sidecar['skipped']}; the indexed and the "
                                "JSONL source would differ")
            sources[join, "indexed"].append(f"{{path:{prefix},kind:indexed,name:{spec.name},weight:{spec.weight}}}")
    return {key: f"[{','.join(found)}]" for key, found in sources.items()}


def joined(path: Path, out: Path, join: int) -> Path:
    """Every `join` consecutive documents of a JSONL file as one (the first one's id, source and skill);
    figure paths made absolute, since `out` is elsewhere than the file they are relative to."""
    docs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    with open(out, "w", encoding="utf-8") as fh:
        for k in range(0, len(docs), join):
            segments = [dict(seg, path=str(path.parent / seg["path"])) if "path" in seg else seg
                        for d in docs[k : k + join] for seg in d["segments"]]
            fh.write(json.dumps(dict(docs[k], segments=segments)) + "\n")
    return out


def cpu_seconds(fn) -> float:
    t0 = time.thread_time()
    fn()
    return time.thread_time() - t0


def decoder_flops_per_token(cfg, vocab: dict[str, int]) -> float:
    """6 x the decoder's matmul parameters one token uses (active parameters less the encoders and the
    embedding lookup) + 12 x layers x heads x head_dim x sequence for attention scores. Encoders are
    left out: counting them would only lower the consumption the data path is held against."""
    with torch.device("meta"):
        model = ScientificMoE(cfg.model, vocab)
    _, active = count_params(model, cfg.model)
    not_matmul = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("encoders.", "tok_embeddings.")))
    head_dim = cfg.model.head_dim or cfg.model.d_model // cfg.model.n_heads
    return 6 * (active - not_matmul) + 12 * cfg.model.n_layers * cfg.model.n_heads * head_dim * cfg.data.seq_len


class TinyStep:
    """The trainer's step functions on the tiny model, one process, fp32."""

    def __init__(self, cfg, tokenizer):
        model = ScientificMoE(cfg.model, vocab_sizes_of(tokenizer))
        init_parameters(model, cfg.trainer.seed, cfg.model.init_std, cfg.model.n_layers)
        self.ctx = DistContext(ParallelDims(), 0, 1, torch.device("cpu"), None)
        self.runner = parallelize(model, self.ctx, ParallelConfig(), scaled_cross_entropy,
                                  autocast_for("fp32", self.ctx.device))
        self.optimizer = build_optimizer(self.runner.model, cfg.trainer)
        self.scheduler, self.moes = build_scheduler(self.optimizer, cfg.trainer), moe_layers(self.runner.model)

    def __call__(self, batch) -> None:
        train_step(self.runner, [batch], self.ctx, 1.0)
        apply_update(self.optimizer, self.scheduler, self.moes)


class ThreadFeeder:
    """Batches made ahead by a thread of this process: the alternative to the worker process."""

    def __init__(self, loader: PackedLoader, depth: int):
        self.loader, self.queue, self.stop = loader, queue.Queue(depth), threading.Event()
        self.thread = threading.Thread(target=self._work)
        self.thread.start()

    def _work(self) -> None:
        while not self.stop.is_set():
            batch = self.loader.next_batch()
            while not self.stop.is_set():
                try:
                    self.queue.put(batch, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def next_batch(self):
        return self.queue.get()

    def close(self) -> None:
        """Stopped before the interpreter exits: torch aborts the process if a thread is still in it then."""
        self.stop.set()
        self.thread.join()


def with_float_patches(batch):
    """The batch with its figures' patches as the float32 values in [0, 1] the encoder makes of them."""
    figure = batch.items["figure"]
    return dataclasses.replace(batch, items={**batch.items, "figure": {**figure, "patches": figure["patches"].float() / 255.0}})


def sending(loader: PackedLoader, n_batches: int) -> dict[str, dict[str, list[float]]]:
    """Per variant: each batch's pickled megabytes and the CPU seconds of pickle.dumps and loads."""
    sent = {variant: {"MB": [], "dumps": [], "loads": []} for variant in ("uint8 patches", "float32 patches")}
    for _ in range(n_batches):
        batch = loader.next_batch()
        for variant, item in (("uint8 patches", batch), ("float32 patches", with_float_patches(batch))):
            data = []
            sent[variant]["dumps"].append(cpu_seconds(lambda: data.append(pickle.dumps(item))))
            sent[variant]["loads"].append(cpu_seconds(lambda: pickle.loads(data[0])))
            sent[variant]["MB"].append(len(data[0]) / 1e6)
    return sent


def count_patches(counts: list[int], batches) -> None:
    """Adds the batches' figure patches to counts: [real ones, positions of the packed rows the
    figure encoder runs over]."""
    for batch in batches:
        if "figure" in batch.items:
            figure_RC = batch.items["figure"]["patch_figure"]
            counts[0] += int((figure_RC >= 0).sum())
            counts[1] += figure_RC.numel()


def report(label: str, times: list[float]) -> float:
    median = statistics.median(times)
    print(f"  {label:34s} median {median * 1e3:8.1f} ms  spread {max(times) / min(times):5.2f}")
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=4, help="batches per variant and round")
    parser.add_argument("--steps", type=int, default=3, help="tiny training steps per variant and round")
    parser.add_argument("--corpus-docs", type=int, default=0, help="documents per built-in source (0 = all)")
    parser.add_argument("--mfu", type=float, default=0.40, help="assumed model FLOPs utilization of moe_1b")
    parser.add_argument("--featurize-threads", type=int, nargs="+", default=[2],
                        help="part 4's data.featurize_threads, each against 1 (a machine with that many idle cores)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="assumed GPU dense bf16 peak (H100/H200 SXM)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        run(args, Path(tmp))


def run(args, tmp: Path) -> None:
    corpus = [f"data.corpus_max_docs_per_source={args.corpus_docs}"]
    cfgs = {name: compose_run_config(["experiment=tiny", f"model={preset}", f"trainer.batch_size={rows}",
                                      f"data.seq_len={seq}", *corpus])
            for name, (preset, rows, seq) in SETTINGS.items()}
    specs = resolve_sources(cfgs["tiny"].data)
    tokenizer = train_tokenizer(specs, cfgs["tiny"].data)
    preset, rows, seq = SETTINGS["moe_1b"]
    moe_sources = {}
    for key, sources in indexed_sources(specs, tokenizer, tmp).items():
        # pyhmmer-proteome has proteins over moe_1b's protein length limit, refused (and timed as documents
        # seen): over enough batches they pass the default budget of bad documents, which stops a run
        moe_sources[key] = ["experiment=tiny", f"model={preset}", f"trainer.batch_size={rows}", f"data.seq_len={seq}",
                            f"data.sources={sources}", "data.max_bad_fraction=1.0"]
        cfgs[SOURCES[key]] = compose_run_config(moe_sources[key])

    def loader(cfg, dp, cls=PackedLoader):
        return cls(cfg.data, resolve_sources(cfg.data), tokenizer, cfg.model.encoders, split="train", batch_size=cfg.trainer.batch_size,
                   seed=cfg.trainer.seed, dp_rank=0, dp_size=dp)

    loaders = {(name, dp): loader(cfg, dp) for name, cfg in cfgs.items() for dp in DP_SIZES}
    upscaled = compose_run_config([*moe_sources[1, "indexed"], "model.encoders.figure.upscale=true"])
    enlarged = {dp: loader(upscaled, dp) for dp in (1, 8)}
    threaded = {(threads, dp): loader(compose_run_config([*moe_sources[1, "indexed"], f"data.featurize_threads={threads}"]), dp)
                for dp in (1, 8) for threads in (1, *args.featurize_threads)}
    tiny = cfgs["tiny"]
    step = TinyStep(tiny, tokenizer)
    step_batches = [loaders["tiny", 1].next_batch() for _ in range(args.steps)]
    # experiment=tiny turns the worker off (0); ahead means data.prefetch_batches' default depth
    ahead = compose_run_config(["experiment=tiny", f"data.prefetch_batches={DataConfig.prefetch_batches}", *corpus])
    feeders = {"training thread": loader(tiny, 1), "thread ahead": ThreadFeeder(loader(ahead, 1), ahead.data.prefetch_batches),
               "worker process (data.prefetch_batches)": loader(ahead, 1, PrefetchingLoader)}
    for feeder in feeders.values():  # warm-up: a step each, the worker's start, the queues filled
        step(feeder.next_batch())
    for ld in [*loaders.values(), *threaded.values(), *enlarged.values()]:
        ld.next_batch()
    frozen = freeze_set_up_objects()
    threaded_wall = {key: [] for key in threaded}

    data_times = {key: [] for key in loaders}
    enlarged_times = {dp: [] for dp in enlarged}
    # per variant and dp: [real patches, positions of the packed rows] over all batches
    patches = {(variant, dp): [0, 0] for variant in ("native", "enlarged") for dp in enlarged}
    packing_times = {key: [] for key in loaders}
    items = {key: 0 for key in loaders}
    docs = {key: 0 for key in loaders}
    step_cpu, fed, fed_cpu = [], {name: [] for name in feeders}, {name: [] for name in feeders}
    for _ in range(args.rounds):
        for key, ld in loaders.items():
            seen_before = sum(ld.skips.seen.values())
            batches = []
            data_times[key].append(cpu_seconds(lambda: batches.extend(ld.next_batch() for _ in range(args.batches)))
                                   / args.batches)
            docs[key] += sum(ld.skips.seen.values()) - seen_before
            none = [False] * ld.batch_size  # the global rows, none of them this rank's
            packing_times[key].append(cpu_seconds(lambda: [ld.next_rows(none) for _ in range(args.batches)]) / args.batches)
            items[key] += sum(int(b.slot_index[m].shape[0]) for b in batches for m in b.slot_index)
            if key[0] == SOURCES[1, "indexed"] and key[1] in enlarged:
                count_patches(patches["native", key[1]], batches)
        for dp, ld in enlarged.items():  # right after part 1's loader of the same batches
            batches = []
            enlarged_times[dp].append(cpu_seconds(lambda: batches.extend(ld.next_batch() for _ in range(args.batches)))
                                      / args.batches)
            count_patches(patches["enlarged", dp], batches)
            for _ in range(args.batches):  # as part 1's loader packs, so both stay at the same batches
                ld.next_rows([False] * ld.batch_size)
        for key, ld in threaded.items():
            t0 = time.perf_counter()
            for _ in range(args.batches):
                ld.next_batch()
            threaded_wall[key].append((time.perf_counter() - t0) / args.batches)
        step_cpu.append(sum(cpu_seconds(lambda: step(b)) for b in step_batches) / args.steps)
        for name, feeder in feeders.items():
            t0, waited = time.perf_counter(), 0.0
            for _ in range(args.steps):
                c0 = time.thread_time()
                batch = feeder.next_batch()
                waited += time.thread_time() - c0
                step(batch)
            fed[name].append((time.perf_counter() - t0) / args.steps)
            fed_cpu[name].append(waited / args.steps)
    for feeder in [*feeders.values(), *threaded.values()]:
        feeder.close()
    sent = sending(threaded[1, 1], args.rounds * args.batches)

    n_batches = args.rounds * args.batches
    print(f"built-in corpus ({args.corpus_docs or 'all'} documents per source), {args.rounds} rounds, "
          f"torch {torch.__version__}, 1 thread; CPU time of the measuring thread; {frozen:,} set-up objects "
          "frozen out of the cycle collector's walks (as the trainer and the data worker do)")
    tiny_tokens = tiny.trainer.batch_size * tiny.data.seq_len
    print("tiny training step (CPU time):")
    consumed = {"tiny": tiny_tokens / report("forward + backward + AdamW", step_cpu)}
    moe = cfgs["moe_1b"]
    flops = decoder_flops_per_token(moe, vocab_sizes_of(tokenizer))
    consumed["moe_1b"] = args.mfu * args.peak_tflops * 1e12 / flops
    consumed.update(dict.fromkeys(SOURCES.values(), consumed["moe_1b"]))
    print(f"consumption per rank: tiny {consumed['tiny']:,.0f} tokens/s (this CPU, measured); moe_1b "
          f"{consumed['moe_1b']:,.0f} tokens/s per GPU (assumed: {flops / 1e9:.2f} GFLOP/token at seq {moe.data.seq_len}, "
          f"{args.mfu:.0%} MFU of {args.peak_tflops:.0f} TFLOP/s)")
    for name, cfg in cfgs.items():
        print(f"featurize + pack, {name} data settings ({cfg.trainer.batch_size} rows x {cfg.data.seq_len}), rank 0 of dp:")
        base = statistics.median(data_times[name, 1])
        for dp in DP_SIZES:
            times = data_times[name, dp]
            median = statistics.median(times)
            rank_tokens = cfg.trainer.batch_size // dp * cfg.data.seq_len
            print(f"  dp={dp}: {docs[name, dp] / n_batches / median:8,.0f} documents/s  {rank_tokens / median:10,.0f} "
                  f"tokens/s  x{rank_tokens / median / consumed[name]:6.2f} consumption   "
                  f"{items[name, dp] / n_batches:6.1f} items featurized/batch  time / dp=1 {median / base:.2f}  "
                  f"spread {max(times) / min(times):.2f}  packing (every rank) {statistics.median(packing_times[name, dp]) / median:.0%}")
    print("tiny step with its batches made (wall time per step; the training thread's CPU time in next_batch):")
    base = None
    for name, times in fed.items():
        median = report(name, times)
        base = base or median
        print(f"  {'':34s} / training thread {median / base:.2f};  next_batch CPU on the training thread "
              f"{statistics.median(fed_cpu[name]) * 1e3:.1f} ms")
    print(f"featurize threads, {SOURCES[1, 'indexed']} data settings (wall time per batch, rank 0 of dp):")
    for dp in (1, 8):
        rank_tokens = moe.trainer.batch_size // dp * moe.data.seq_len
        for threads in (1, *args.featurize_threads):
            times = threaded_wall[threads, dp]
            median = statistics.median(times)
            # both read the same batches in a round, whose figures vary: the ratio is taken round by round
            ratios = [t / one for t, one in zip(times, threaded_wall[1, dp])]
            against = ("" if threads == 1 else f"  / 1 thread {statistics.median(ratios):.2f} "
                                                f"(rounds {min(ratios):.2f} to {max(ratios):.2f})")
            print(f"  dp={dp}, data.featurize_threads={threads}: {median * 1e3:8.1f} ms  "
                  f"x{rank_tokens / median / consumed['moe_1b']:6.2f} consumption{against}  spread {max(times) / min(times):.2f}")
    print(f"sending a batch from the data worker, {SOURCES[1, 'indexed']} data settings, dp=1 (medians over "
          f"{len(sent['uint8 patches']['MB'])} batches; CPU time):")
    base = sent["float32 patches"]
    for variant, found in sent.items():
        mb, dumps, loads = (statistics.median(found[key]) for key in ("MB", "dumps", "loads"))
        print(f"  {variant:16s} {mb:7.1f} MB  pickle.dumps {dumps * 1e3:6.1f} ms  loads {loads * 1e3:6.1f} ms  "
              f"/ float32 patches: MB {mb / statistics.median(base['MB']):.2f}, dumps + loads "
              f"{(dumps + loads) / (statistics.median(base['dumps']) + statistics.median(base['loads'])):.2f}")

    print(f"figure resolution, {SOURCES[1, 'indexed']} data settings (CPU time per batch, rank 0 of dp; "
          "native is part 1's):")
    for dp in enlarged:
        rank_tokens = moe.trainer.batch_size // dp * moe.data.seq_len
        native = data_times[SOURCES[1, "indexed"], dp]
        ratios = [one / big for one, big in zip(native, enlarged_times[dp])]  # the same batches in a round
        for variant, times in (("native (figure.upscale=false)", native),
                               ("enlarged (figure.upscale=true)", enlarged_times[dp])):
            median = statistics.median(times)
            real, padded = patches[variant.split()[0], dp]
            print(f"  dp={dp}, {variant:30s} {median * 1e3:8.1f} ms  x{rank_tokens / median / consumed['moe_1b']:6.2f} "
                  f"consumption  {real / n_batches:8,.0f} patches/batch in {padded / n_batches:8,.0f} positions  "
                  f"spread {max(times) / min(times):.2f}")
        print(f"  dp={dp}, native / enlarged {statistics.median(ratios):.2f} "
              f"(rounds {min(ratios):.2f} to {max(ratios):.2f})")


if __name__ == "__main__":
    main()
