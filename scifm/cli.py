"""The `scifm` command: train | data build | data tokenize | params | plan | eval | export | submit | jobs."""

from __future__ import annotations

import argparse
import os
import sys

from scifm.core.errors import ScifmError, exit_on_user_error

USAGE = """usage: scifm COMMAND [ARGS]

commands:
  train [KEY=VALUE ...]     train (Hydra overrides, e.g. experiment=tiny trainer.max_steps=100)
  data build [--out DIR]    build the built-in corpus from data shipped in pip packages
  data tokenize INPUT ... --tokenizer DIR --out PREFIX [--docs-per-shard N] [--workers N]
                            JSONL files or directories -> Megatron-Core .bin/.idx shards of
                            scifm token ids, read by data.sources=[{path:PREFIX,kind:indexed}]
  params [KEY=VALUE ...]    total and active parameter counts of a model config, built on the
                            meta device (e.g. scifm params model=paper_1t)
  plan [--json] [KEY=VALUE ...]
                            per-GPU memory and step time of every valid layout of a config on
                            cluster.nodes x cluster.gpus_per_node GPUs (or the parallel.* given),
                            ranked; hardware assumptions as plan.* keys (e.g. plan.gpu_memory_gb=80)
  eval checkpoint=PATH [eval.tasks=[...]] [eval.task_files=[...]] [KEY=VALUE ...]
                            evaluate a checkpoint, a run's checkpoints or a glob on built-in
                            and user tasks; writes results.json, report.md, samples/
  eval compare RUN_OR_EVAL_DIR ... [--out DIR]
                            score against training step and against model size (PNG + Markdown)
  export CHECKPOINT [--out FILE]
                            consolidate a checkpoint saved under any layout into one
                            safetensors file (default CHECKPOINT/model.safetensors)
  export hf CHECKPOINT --out DIR [--dtype float32|bfloat16] [--max-shard-gb N]
                            a transformers model directory (Qwen3-MoE or GLM-4.5-MoE, chosen
                            from the model), with scifm's encoders and tokenizer beside it
  submit [--dry-run] [--eval-after] [-m] [KEY=VALUE ...]
                            run the config as a Slurm job (cluster=NAME cluster.nodes=N ...);
                            --eval-after queues an eval array over its checkpoints
  jobs RUN_DIR ...          state of the Slurm jobs submitted for a run or sweep
"""


def data_main(argv: list[str]) -> None:
    from scifm.data.corpus import build_corpus, default_corpus_dir

    parser = argparse.ArgumentParser(prog="scifm data")
    sub = parser.add_subparsers(dest="action", required=True)
    build = sub.add_parser("build", help="build the built-in corpus")
    build.add_argument("--out", default=None, help="output directory (default: the cache)")
    build.add_argument("--max-docs-per-source", type=int, default=None)
    tokenize = sub.add_parser("tokenize", help="write JSONL documents as an indexed dataset")
    tokenize.add_argument("inputs", nargs="+", help=".jsonl(.gz) files or directories searched recursively")
    tokenize.add_argument("--tokenizer", required=True, help="a saved tokenizer: a run's or a checkpoint's tokenizer/")
    tokenize.add_argument("--out", required=True, help="output prefix: PREFIX.bin/.idx, PREFIX.json, PREFIX.tokenizer/")
    tokenize.add_argument("--docs-per-shard", type=int, default=0, help="documents per shard (0 = one shard)")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    tokenize.add_argument("--workers", type=int, default=cpus,
                          help="tokenizing processes (default: the CPUs this process may use)")
    args = parser.parse_args(argv)
    if args.action == "tokenize":
        tokenize_main(args)
        return
    out = args.out or default_corpus_dir()
    report = build_corpus(out, max_docs_per_source=args.max_docs_per_source)
    n_docs = sum(report["docs_per_source"].values())
    print(f"built-in corpus: {n_docs} documents from {len(report['docs_per_source'])} sources in {out}")
    for source, n in sorted(report["docs_per_source"].items()):
        print(f"  {source:28s} {n:6d}")


def tokenize_main(args: argparse.Namespace) -> None:
    from pathlib import Path

    from scifm.data.indexed.write import tokenize_corpus

    meta = tokenize_corpus(args.inputs, Path(args.tokenizer), Path(args.out), args.docs_per_shard, args.workers)
    print(f"indexed dataset {args.out}: {meta['documents']} documents, {meta['tokens']} tokens "
          f"({meta['dtype']}) in {len(meta['shards'])} shard(s); sidecar {args.out}.json")
    for reason, n in meta["skipped"].items():
        print(f"  skipped {n:6d} {reason:20s} e.g. {meta['skip_examples'][reason]}")


def params_main(overrides: list[str]) -> None:
    from scifm.config import compose_run_config
    from scifm.model.transformer import count_params
    from scifm.plan.shapes import meta_model, vocab_sizes

    cfg = compose_run_config(overrides).model
    cfg.validate()
    # encoder input vocabularies come from a tokenizer; for counting, typical sizes suffice
    total, active = count_params(meta_model(cfg, vocab_sizes(cfg)), cfg)
    print(f"model {cfg.name}: total {total:,} parameters ({total / 1e9:.3f} B), "
          f"active per token {active:,} ({active / 1e9:.3f} B)")


def plan_main(argv: list[str]) -> None:
    import json

    from scifm.plan.planner import make_plan
    from scifm.plan.report import json_report, text_report

    as_json = "--json" in argv
    plan = make_plan([a for a in argv if a != "--json"])
    print(json.dumps(json_report(plan), indent=1) if as_json else text_report(plan))


def export_hf_main(argv: list[str]) -> None:
    from pathlib import Path

    import torch

    from scifm.train.export import export_hf

    parser = argparse.ArgumentParser(prog="scifm export hf")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard (GiB)")
    args = parser.parse_args(argv)
    arch, notes = export_hf(args.checkpoint, args.out, getattr(torch, args.dtype), int(args.max_shard_gb * 2**30))
    for note in notes:
        print(f"note: {note}")
    print(f"exported {args.checkpoint} to {args.out} ({arch}; load with "
          f"transformers.AutoModelForCausalLM.from_pretrained)")


def export_main(argv: list[str]) -> None:
    from pathlib import Path

    from scifm.train.export import export_checkpoint

    if argv and argv[0] == "hf":
        export_hf_main(argv[1:])
        return
    parser = argparse.ArgumentParser(prog="scifm export")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = export_checkpoint(args.checkpoint, args.out or args.checkpoint / "model.safetensors")
    print(f"exported {args.checkpoint} to {out}")


def eval_main(argv: list[str]) -> None:
    if argv and argv[0] == "compare":
        from pathlib import Path

        from scifm.eval.compare import compare

        parser = argparse.ArgumentParser(prog="scifm eval compare")
        parser.add_argument("paths", nargs="+", type=Path, help="run directories or evaluation output directories")
        parser.add_argument("--out", type=Path, default=Path("eval_compare"))
        args = parser.parse_args(argv[1:])
        for path in compare(args.paths, args.out):
            print(f"wrote {path}")
        return
    from scifm.eval.config import compose_eval_config
    from scifm.eval.runner import run_eval

    run_eval(compose_eval_config(argv))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    try:
        if command == "train":
            from scifm.train.entry import hydra_train

            sys.argv = ["scifm train", *rest]  # Hydra reads its overrides from sys.argv
            hydra_train()
        elif command == "data":
            data_main(rest)
        elif command == "params":
            params_main(rest)
        elif command == "plan":
            plan_main(rest)
        elif command == "eval":
            eval_main(rest)
        elif command == "export":
            export_main(rest)
        elif command == "submit":
            from scifm.launch.submit import submit_main

            submit_main(rest)
        elif command == "jobs":
            from scifm.launch.jobs import jobs_main

            jobs_main(rest)
        else:
            print(f"scifm: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
            sys.exit(2)
    except ScifmError as err:
        exit_on_user_error(err)


if __name__ == "__main__":
    main()
