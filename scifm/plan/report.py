"""The plan as text (a ranked table, the top choice explained, why common alternatives lose, the
assumptions and formulas) and as JSON for scripts."""

from __future__ import annotations

import dataclasses
from collections import Counter

from scifm.plan import memory_model
from scifm.plan.encoder_load import SAMPLED_RANKS
from scifm.plan.planner import GIB, Plan, Row, describe_batch
from scifm.plan.time_model import FORMULAS

MEMORY_FORMULAS = """\
params    = 4 bytes x this rank's elements: tp splits the dimension its plan names, ep the experts (E/ep),
            FSDP2 dimension 0 over dp_shard (experts under ep: dp_shard_out), rank 0 taking ceil(rows/shards)
grads     = params (fp32; under tp without FSDP the embedding's gradient is whole); optimizer = 2 x params (AdamW)
activations = micro-batches in flight x sum over blocks of tokens x bytes/token (ACTIVATION_BYTES; a checkpointed
            block keeps its input only, plus one block recomputed) + bf16 weight copies (bf16 compute over fp32
            weights) + document mask and RoPE tables + embeddings and the encoders' saved tensors (first stage;
            sampled from the run's data) + logits at the loss (last stage)
buffers   = FSDP's gathered weights at the loss's backward (the root's embedding and output layer; a pipeline
            stage keeps all of its blocks too) + what a block's backward adds beyond the freed logits (it and the
            next block gathered, its unsharded gradients and their reduce-scatter copy) + pipeline send/receive
step peak = grads + activations + buffers where a backward runs before the last forward (gradient accumulation,
            1F1B past its warm-up), else max(grads, activations) + buffers (backward frees as it makes gradients)
fits      = params + optimizer + step peak <= gpu_memory_gb - reserved_gb"""

NOT_MODELED = [
    "the zero-bubble schedules' savings (their bubble is counted as Interleaved1F1B's)",
    "engines other than native (DeepSpeed's ZeRO and Megatron-Core shard differently)",
    "the optimizer step's own time and collectives (under sequence parallelism the norms' weight gradients are "
    "all-reduced there), kernel launches and allocator fragmentation (reserved_gb stands for it)",
    "FSDP2's copies into and out of its communication buffers and DTensor's per-operator dispatch",
]

PARTS_NAMES = {"params": "parameters", "grads": "gradients", "optimizer": "optimizer state",
               "activations": "activations", "buffers": "communication buffers"}


def not_modeled(plan: Plan) -> list[str]:
    missing = []
    if plan.encoders is None:
        missing.append("the modality encoders' activations and FLOPs: they depend on how many items a batch holds; "
                       "give plan.tokenizer=DIR (the run's tokenizer) to sample them from the run's data")
    if not plan.hardware.routing_metrics:
        missing.append("routing imbalance: every expert is assumed to receive its even share of the tokens; give "
                       "plan.routing_metrics=FILE (a run's metrics.jsonl) to weigh the busiest ep rank by its routing")
    return missing + NOT_MODELED


def routing_line(plan: Plan) -> str:
    eps = sorted({row.layout.dims.ep for row in plan.rows} - {1})
    if not plan.hardware.routing_metrics or not eps:
        return "routing: every expert its even share of the tokens"
    shares = ", ".join(f"{plan.routing.imbalance(ep):.3f} at ep={ep}" for ep in eps)
    return (f"routing (plan.routing_metrics, {plan.routing.n_blocks} logged blocks): the busiest ep rank takes "
            f"{shares} times an even share of the routed rows (its experts' work and all-to-all rows scale by it)")


def encoders_line(plan: Plan) -> str:
    if plan.encoders is None:
        return "encoders: not modeled (no plan.tokenizer to read the run's data with)"
    return (f"encoders: measured over the first {plan.hardware.sample_steps} steps' micro-batches of the run's data "
            f"(up to {SAMPLED_RANKS} data-parallel ranks of each layout): the fullest one's saved tensors, the "
            "busiest rank's forward FLOPs per micro-batch, averaged")


def gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def largest_part(row: Row) -> str:
    name, value = max(row.memory.parts().items(), key=lambda kv: kv[1])
    return f"{PARTS_NAMES[name]} {gib(value)} GiB"


def why_not(row: Row, top: Row, usable: float) -> str:
    if not row.fits:
        return f"does not fit: {gib(row.memory.total)} GiB > {gib(usable)} GiB, {largest_part(row)}"
    slower = row.time.total / top.time.total - 1
    name, extra = max(((k, v - top.time.parts()[k]) for k, v in row.time.parts().items()), key=lambda kv: kv[1])
    return (f"fits ({gib(row.memory.total)} GiB) but its step takes {row.time.total:.3g} s, {100 * slower:.0f}% "
            f"longer: {name} +{extra:.3g} s")


def alternatives(plan: Plan, top: Row) -> list[tuple[str, Row]]:
    """Common alternatives, each the best row of its kind: what a user would try instead."""
    p = top.layout.parallel
    kinds = [
        ("pure FSDP (dp_shard = every GPU, no tp, ep or pp)", lambda q: q.dp_shard == plan.world and q.ep == 1),
        ("no expert parallelism (ep=1)", lambda q: q.ep == 1 and p.ep > 1),
        ("no tensor parallelism (tp=1)", lambda q: q.tp == 1 and p.tp > 1),
        ("no pipeline (pp=1)", lambda q: q.pp == 1 and p.pp > 1),
        ("no activation checkpointing", lambda q: q.activation_checkpoint == "none" and p.activation_checkpoint != "none"),
        ("fp32 gathered weights (mixed_precision=fp32)", lambda q: q.mixed_precision == "fp32" and p.mixed_precision == "bf16"),
    ]
    kinds.append(("fastest layout regardless of memory", lambda q: True))
    out, shown = [], {id(top)}
    for title, matches in kinds:
        rows = [r for r in plan.rows if matches(r.layout.parallel)]
        best = min(rows, key=lambda r: r.time.total) if title.startswith("fastest") else next(iter(rows), None)
        if best is not None and id(best) not in shown:
            shown.add(id(best))
            out.append((title, best))
    return out


def text_report(plan: Plan) -> str:
    hw, shapes, run = plan.hardware, plan.shapes, plan.run
    nodes, gpn = run.cluster.nodes, run.cluster.gpus_per_node
    width = max(len(r.layout.label()) for r in plan.rows[:hw.top])
    lines = [
        f"scifm plan: model {shapes.cfg.name} ({shapes.total_params / 1e9:.2f}B parameters, "
        f"{shapes.active_params / 1e9:.2f}B active per token) on {nodes} node(s) x {gpn} GPUs = {plan.world} GPUs",
        f"batch: {describe_batch(run)}; pipeline schedule {run.parallel.pp_schedule}",
        f"hardware (plan.*): {hw.gpu_memory_gb:g} GiB per GPU, {hw.reserved_gb:g} reserved; peak TFLOP/s "
        f"bf16 {hw.peak_tflops_bf16:g}, fp8 {hw.peak_tflops_fp8:g}, fp32 {hw.peak_tflops_fp32:g}; mfu {hw.mfu:g}; "
        f"per GPU intra-node {hw.intra_node_gbps:g} GB/s and {hw.intra_node_latency_us:g} us a collective step, "
        f"inter-node {hw.inter_node_gbps:g} GB/s and {hw.inter_node_latency_us:g} us; FSDP's communication "
        f"{'overlaps' if hw.comm_overlap else 'does not overlap'} the compute",
        f"layouts: {len(plan.rows)} valid, {len(plan.fitting)} fit in {gib(plan.usable_bytes)} GiB; "
        f"{len(plan.rejected)} rejected",
        "",
        f"{'#':>3} {'layout':{width}} {'params':>7} {'grads':>6} {'optim':>6} {'activ':>6} {'buffer':>6} {'total':>6} fits"
        f" | {'compute':>8} {'tp':>7} {'ep':>7} {'stats':>7} {'bubble':>7} {'p2p':>7} {'dp':>7} {'step s':>8}"
        f" {'tok/s':>9}",
    ]
    for i, row in enumerate(plan.rows[:hw.top], 1):
        m, t = row.memory, row.time
        lines.append(
            f"{i:>3} {row.layout.label():{width}} {gib(m.params):>7} {gib(m.grads):>6} {gib(m.optimizer):>6} "
            f"{gib(m.activations):>6} {gib(m.buffers):>6} {gib(m.total):>6} {'yes' if row.fits else 'no ':4}"
            f"| {t.compute:8.3g} {t.tp:7.3g} {t.ep:7.3g} {t.stats:7.3g} {t.pp_bubble:7.3g} {t.pp_p2p:7.3g} "
            f"{t.dp_exposed:7.3g} {t.total:8.3g} {t.tokens_per_s:9.3g}")
    lines.append("memory in GiB on the fullest GPU; time in seconds per step (stats: the routing statistics' "
                 "all-reduces over the data-parallel ranks; dp: the part FSDP cannot hide behind compute)")
    lines += [""] + explanation(plan)
    if plan.rejected:
        lines += ["", "rejected layouts (count, reason as `scifm train` gives it, for one of them):"]
        by_key = Counter(reason.split(":")[0] for _, reason in plan.rejected)
        for key, n in by_key.most_common():
            layout, reason = next((l, r) for l, r in plan.rejected if r.split(":")[0] == key)
            lines.append(f"  {n:5d}  {layout.label()}: {reason}")
    lines += ["", "memory model:", *("  " + x for x in MEMORY_FORMULAS.splitlines()),
              "  activation bytes per token and block (fp32 | bf16): " + ", ".join(
                  f"{k} {v} | {memory_model.ACTIVATION_BYTES['bf16'][k]}"
                  for k, v in memory_model.ACTIVATION_BYTES["fp32"].items()),
              "time model:", *("  " + x for x in FORMULAS.splitlines()),
              encoders_line(plan), routing_line(plan), "not modeled:", *(f"  - {x}" for x in not_modeled(plan))]
    return "\n".join(lines)


def explanation(plan: Plan) -> list[str]:
    if not plan.fitting:
        best = plan.rows[0]
        return [f"no layout fits: the smallest, {best.layout.label()}, needs {gib(best.memory.total)} GiB > "
                f"{gib(plan.usable_bytes)} GiB ({largest_part(best)}); add GPUs, lower trainer.batch_size or "
                f"data.seq_len, or raise plan.gpu_memory_gb"]
    top = plan.fitting[0]
    m, t = top.memory, top.time
    detail = ", ".join(f"{k} {gib(v)}" for k, v in m.detail.items() if v >= 0.05 * GIB)
    lines = [
        f"top choice: {top.layout.label()}",
        f"  run it with: {' '.join(top.layout.overrides())}",
        f"  memory: {gib(m.total)} of {gib(plan.usable_bytes)} GiB usable on pipeline rank {m.pp_rank}: "
        + ", ".join(f"{PARTS_NAMES[k]} {gib(v)}" for k, v in m.parts().items()) + (f" ({detail})" if detail else ""),
        f"  time: {t.total:.3g} s per step, {t.tokens_per_s:,.0f} tokens/s: "
        + ", ".join(f"{k} {v:.3g} s ({100 * v / t.total:.0f}%)" for k, v in t.parts().items() if v > 0),
        f"  why: the shortest predicted step of the {len(plan.fitting)} layouts that fit",
        "alternatives:",
    ]
    lines += [f"  - {title}, {row.layout.label()}: {why_not(row, top, plan.usable_bytes)}"
              for title, row in alternatives(plan, top)]
    return lines


def json_report(plan: Plan) -> dict:
    def row_json(rank: int, row: Row) -> dict:
        p = row.layout.parallel
        return {
            "rank": rank, "layout": {k: getattr(p, k) for k in ("dp_replicate", "dp_shard", "tp", "pp", "ep",
                                                               "activation_checkpoint", "mixed_precision", "pp_split")},
            "overrides": row.layout.overrides(), "fits": row.fits,
            "ep_imbalance": plan.routing.imbalance(row.layout.dims.ep),
            "memory_bytes": {**row.memory.parts(), "step_peak": row.memory.step_peak, "total": row.memory.total,
                             "pp_rank": row.memory.pp_rank,
                             "detail": row.memory.detail},
            "time_s": {**row.time.parts(), "recompute": row.time.recompute, "dp_total": row.time.dp,
                       "step": row.time.total}, "tokens_per_s": row.time.tokens_per_s,
        }

    return {
        "model": {"name": plan.shapes.cfg.name, "total_params": plan.shapes.total_params,
                  "active_params": plan.shapes.active_params},
        "gpus": plan.world, "nodes": plan.run.cluster.nodes, "gpus_per_node": plan.run.cluster.gpus_per_node,
        "batch": describe_batch(plan.run), "hardware": dataclasses.asdict(plan.hardware),
        "usable_bytes": plan.usable_bytes,
        "formulas": {"memory": MEMORY_FORMULAS, "activation_bytes": memory_model.ACTIVATION_BYTES, "time": FORMULAS},
        "encoders": encoders_line(plan), "routing": routing_line(plan), "not_modeled": not_modeled(plan),
        "explanation": explanation(plan),
        "rows": [row_json(i, r) for i, r in enumerate(plan.rows, 1)],
        "rejected": [{"overrides": layout.overrides(), "reason": reason} for layout, reason in plan.rejected],
    }
