"""Seconds of one optimizer step under a layout, from FLOPs at the stated MFU and bytes over the
stated bandwidths (formulas in FORMULAS, printed with every report).

Compute is counted per rank, as the layout splits the work: tp divides attention, the dense FFN,
shared experts and the output layer; the routed experts run whole on every tp rank unless ep spans
the tp ranks (tensor_parallel.py leaves them replicated); the router runs whole everywhere; a
pipeline rank runs its own stages' layers. Every collective costs its bytes over the link's bandwidth
plus its steps (n-1 for a ring over n ranks) times the link's latency. TP, EP and pipeline transfers
sit on the critical path; FSDP's all-gathers and reduce-scatters overlap the compute on GPUs (FSDP2
prefetches the next block), so only the part longer than the compute counts; with
plan.comm_overlap=false (gloo on a CPU, whose collectives take the compute's cores) all of it counts.
The modality encoders' FLOPs (first stage, whole on every tp rank) are measured on the run's own data
where a tokenizer is given (encoder_load.py).
The routing statistics' all-reduce over the dp ranks (a few hundred bytes per MoE block, in the
forward's path) counts its latency, over a tree's hops as NCCL runs so small a reduction.
Routing imbalance under ep scales the routed experts' work and rows on the busiest ep rank by the factor
a run's logged routing gives (plan.routing_metrics, routing_load.py). Not modeled: kernel launches, the
optimizer step's time and collectives, FSDP2's buffer copies and DTensor's dispatch, and the zero-bubble
schedules' savings (their bubble is counted as Interleaved1F1B's, an upper bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scifm.config import RunConfig
from scifm.model.flops import keys_visited, layer_forward_flops, output_forward_flops
from scifm.parallel.comm_count import RING_PASSES
from scifm.parallel.fsdp import recomputes
from scifm.parallel.pipeline import layer_ranges, stages_of_rank
from scifm.plan.config import PlanConfig
from scifm.plan.encoder_load import EncoderSampler
from scifm.plan.layouts import Layout
from scifm.plan.memory_model import FP32, LayoutSizes, compute_dtype, encoder_regime, tensors_numel
from scifm.plan.shapes import ModelShapes

FORMULAS = """\
compute   = 3 x forward FLOPs of this rank's layers (+1 forward of checkpointed blocks) / (peak x mfu)
            forward FLOPs per token: attention 2*d*(h+2*kv)*hd + 2*h*hd*d + 4*K*h*hd  (/tp),
            K = the keys a query's SDPA call is given: S, or under blocks of queries
            (model.attention_query_block) the end of the query's block, averaged over the queries;
            dense FFN 6*d*ffn (/tp), router 2*d*E, routed experts top_k*6*d*expert_ffn (/tp only when ep > 1;
            x the busiest ep rank's imbalance i, from plan.routing_metrics, 1 without),
            shared experts 6*d*shared (/tp), output 2*d*V (/tp); tokens per rank = rows/dp x seq_len x grad_accum;
            + the encoders' forward FLOPs per micro-batch of the busiest dp rank's rows, measured on the run's
              data (first stage)
tp        = micro-batches x sum over the collectives of passes x (tp-1)/tp x bytes / bw, each of the residual
            (tokens x d x act_bytes) but the loss's: per dense block 8 under sequence parallelism (all-gather
            and reduce-scatter around attention and the FFN, forward and backward) or 4 all-reduces without;
            per MoE block attention's, under SP 2 all-gathers (the experts' input, its output's gradient),
            with shared experts 2 all-reduces; a recomputed block repeats its forward's (a dense block's
            but its last); the embedding's all-reduce (first stage); under SP each stage's first block's
            gradient gathered and every stage but the last's output gathered; the output layer's
            all-gather and reduce-scatter (SP) or all-reduce; the loss's 3 all-reduces of tokens x 4 bytes
            (loss parallel) or an all-gather of the logits; under FSDP an all-reduce of each norm weight's
            gradient (SP) and each q/k norm's. passes: all-gather and reduce-scatter 1, all-reduce 2
ep        = micro-batches x [(4 x MoE blocks + 2 x recomputed ones) x (ep-1)/ep x tokens x top_k x d x act_bytes
              x i / tp
            + (MoE blocks + recomputed ones) x (ep-1)/ep x experts x 8
            + (2 x MoE blocks + recomputed ones) x (tp-1)/tp x tokens x top_k x d x act_bytes] / bw
            (dispatch+combine fwd, bwd and recompute; each forward's exchange of token counts; the
            all-gather over tp and its backward)
stats     = micro-batches x (2 x MoE blocks + recomputed ones) x [2 x (dp-1)/dp x (2 x experts + 3) x 8 / bw
            + 2 x ceil(log2 dp) x latency]   (each MoE forward all-reduces its routing sums, float64, over
            the dp ranks, and its backward their gradient; a tree: up and down log2(dp) hops)
pp bubble = compute x (pp-1) / (virtual stages x micro-batches);  pp p2p = 2 x v x micro-batches x tokens x d x act_bytes / bw
dp        = rounds x [(n-1)/n x (g x units' weights + root's) x gathered_bytes + (n-1)/n x all weights x 4
            + 2 x (r-1)/r x shard x 4] / bw   (all-gathers, fp32 reduce-scatter, HSDP all-reduce; n = dp_shard,
            dp_shard_out for the experts' units under ep; r = dp_replicate; units = blocks, encoders, experts
            under ep, each its own all-gathers and reduce-scatter; the root (embedding, norm, output) stays
            gathered from forward to backward). Outside a pipeline g = 2 (forward and backward) and rounds =
            micro-batches; a pipeline stage keeps its weights gathered and gradients unsharded over the step:
            g = 1, rounds = 1. Where plan.comm_overlap (FSDP overlaps the compute) only max(0, dp - compute)
            counts
latency   = each collective adds its steps x the link's latency (plan.intra/inter_node_latency_us): ring
            all-gather and reduce-scatter over n ranks n-1 steps, all-reduce 2(n-1); an all-to-all (its sends to
            every peer go at once) and a pipeline send 1
bw        = intra_node_gbps when the group's ranks share a node (tp innermost, then ep, dp_shard, dp_replicate, pp
            outermost), else inter_node_gbps
step      = compute + tp + ep + stats + pp bubble + pp p2p + exposed dp"""


@dataclass
class TimeBreakdown:
    compute: float  # seconds, recomputation included
    recompute: float  # of which recomputation
    tp: float
    ep: float
    stats: float  # the routing statistics' all-reduces over the data-parallel ranks
    pp_bubble: float
    pp_p2p: float
    dp: float  # FSDP/HSDP communication, whole
    dp_exposed: float  # the part not hidden behind the compute
    tokens_per_step: int

    @property
    def total(self) -> float:
        return self.compute + self.tp + self.ep + self.stats + self.pp_bubble + self.pp_p2p + self.dp_exposed

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.total

    def parts(self) -> dict[str, float]:
        return {"compute": self.compute, "tp": self.tp, "ep": self.ep, "stats": self.stats,
                "pp_bubble": self.pp_bubble, "pp_p2p": self.pp_p2p, "dp_exposed": self.dp_exposed}


# what tp divides of a block's work, by part (scifm.model.flops's parts); the routed experts run
# whole on every tp rank unless ep spans the tp ranks, the router runs whole everywhere
TP_SPLIT = {"attention projections", "attention scores and values", "dense feed-forward", "shared experts"}


def rank_block_flops(shapes: ModelShapes, moe: bool, s: LayoutSizes) -> float:
    """Forward FLOPs per token of one decoder block on one rank. The document mask is arbitrary, so
    SDPA's kernels compute every query-key pair they are given: attention counts the keys each block
    of queries gets."""
    parts = layer_forward_flops(shapes.cfg, moe, keys_visited(s.seq, shapes.cfg.attention_query_block))
    if "routed experts" in parts:  # the busiest ep rank's rows, which every rank waits for
        parts["routed experts"] *= s.ep_imbalance
    split = TP_SPLIT | ({"routed experts"} if s.ep > 1 else set())
    return sum(flops / s.tp if part in split else flops for part, flops in parts.items())


def step_time(shapes: ModelShapes, run: RunConfig, layout: Layout, plan: PlanConfig, gpus_per_node: int,
              encoders: EncoderSampler | None = None, ep_imbalance: float = 1.0) -> TimeBreakdown:
    s = LayoutSizes(run, layout, ep_imbalance)
    encoder_flops = encoders.load(s.dp, encoder_regime(s)).forward_flops if encoders is not None else 0.0
    cfg = shapes.cfg
    peak = plan.peak_flops(compute_dtype(run)) * plan.mfu
    tokens = s.tokens * s.microbatches  # this data-parallel rank's tokens in one step
    ranges = layer_ranges(cfg.n_layers, s.n_stages, s.split)
    per_kind = {moe: rank_block_flops(shapes, moe, s) for moe in (False, True)}
    worst = (0.0, 0.0, [], [])
    for pp_rank in range(s.pp):
        stages = stages_of_rank(pp_rank, s.pp, s.virtual, s.schedule) if s.pp > 1 else [0]
        layer_ids = [i for st in stages for i in ranges[st]]
        per_layer = [per_kind[i >= cfg.n_dense_layers] for i in layer_ids]
        checkpointed = sum(f for k, f in enumerate(per_layer) if recomputes(s.ac, k))
        forward = sum(per_layer) + (output_forward_flops(cfg, shapes.vocab) / s.tp if s.n_stages - 1 in stages else 0)
        flops = tokens * (3 * forward + checkpointed) + (3 * s.microbatches * encoder_flops if 0 in stages else 0)
        if flops > worst[0]:
            worst = (flops, tokens * checkpointed, layer_ids, stages)
    flops, recompute_flops, layer_ids, stages = worst
    compute = flops / peak

    def link(span: int) -> tuple[float, float]:
        """(bytes/s, seconds per collective step) for a group whose ranks span `span` consecutive ranks."""
        if gpus_per_node > 0 and span <= max(gpus_per_node, 1):
            return plan.intra_node_gbps * 1e9, plan.intra_node_latency_us * 1e-6
        return plan.inter_node_gbps * 1e9, plan.inter_node_latency_us * 1e-6

    def seconds(moved_bytes: float, steps: int, span: int) -> float:
        """Collectives moving `moved_bytes` per rank in `steps` latency steps in all."""
        bandwidth, latency = link(span)
        return moved_bytes / bandwidth + steps * latency

    d = layout.dims
    a, m = s.act_bytes, s.microbatches
    recomputed = [recomputes(s.ac, k) for k in range(len(layer_ids))]
    residual = s.tokens * cfg.d_model * a
    tp = m * _tp_seconds(cfg, shapes.vocab, s, layer_ids, stages, recomputed, seconds) if s.tp > 1 else 0.0
    moe = [i >= cfg.n_dense_layers for i in layer_ids]
    n_moe = sum(moe)
    ep = m * _ep_seconds(cfg, s, moe, recomputed, seconds) if s.ep > 1 and n_moe else 0.0
    stats = m * _stats_seconds(cfg, s, moe, recomputed, seconds) if s.dp > 1 and n_moe else 0.0
    pp_bubble = compute * (s.pp - 1) / (s.virtual * m) if s.pp > 1 else 0.0
    pp_p2p = seconds(2 * s.virtual * m * residual, 2 * s.virtual * m, d.world_size // s.pp + 1) if s.pp > 1 else 0.0
    dp = _dp_seconds(shapes, s, layer_ids, n_moe, 0 in stages, s.n_stages - 1 in stages, seconds)
    return TimeBreakdown(compute=compute, recompute=recompute_flops / peak, tp=tp, ep=ep, stats=stats,
                         pp_bubble=pp_bubble, pp_p2p=pp_p2p, dp=dp,
                         dp_exposed=max(0.0, dp - compute) if plan.comm_overlap else dp,
                         tokens_per_step=run.trainer.batch_size * run.trainer.grad_accum * s.seq)


def _tp_block_collectives(moe: bool, shared: bool, sp: bool) -> tuple[list[str], list[str], list[str]]:
    """(forward, backward, recomputed) collectives of one block under tp, each of the residual stream's
    size (tensor_parallel.py's plan). Attention and the dense FFN: under sequence parallelism their
    input is gathered and their output reduce-scattered, and the backward does the reverse; without it
    the output is all-reduced, and in backward the input's gradient once (q, k and v add theirs first).
    The MoE runs its router and routed experts whole on every rank: under sequence parallelism it
    gathers its input and, in backward, its output's gradient; its shared experts are column- and
    row-parallel, an all-reduce each way. A recomputed block runs its forward's collectives again up
    to its last tensor saved for backward (torch's checkpoint stops there): a dense block's output
    reduction is not repeated, an MoE block's is (its routing statistics come after it)."""
    around = (["all_gather", "reduce_scatter"], ["all_gather", "reduce_scatter"]) if sp else (["all_reduce"], ["all_reduce"])
    if not moe:
        forward = around[0] * 2
        return forward, around[1] * 2, forward[:-1]
    forward, backward = (["all_gather"], ["all_gather"]) if sp else ([], [])
    if shared:
        forward, backward = forward + ["all_reduce"], backward + ["all_reduce"]
    return around[0] + forward, around[1] + backward, around[0] + forward


def _tp_seconds(cfg, vocab: int, s: LayoutSizes, layer_ids: list[int], stages: list[int], recomputed: list[bool],
                seconds) -> float:
    """One micro-batch's tensor-parallel collectives on this pipeline rank: its blocks' (with what a
    recomputed block repeats), and around them: the vocabulary-parallel embedding's all-reduce (first
    stage); under sequence parallelism each stage's first block takes its sequence shard (whose backward
    gathers the gradient) and every stage but the last gathers its output for the next one; the output
    layer (last stage) gathers its input and reduce-scatters that gradient, or without sequence
    parallelism all-reduces it; under loss parallelism the loss all-reduces three numbers a token (the
    max, the sum of exponentials, the target's logit), else the logits are gathered whole. Under FSDP
    the replicated weights whose gradients are partial sums over the tp ranks are all-reduced too."""
    residual = s.tokens * cfg.d_model * s.act_bytes
    sized: list[tuple[str, float]] = []  # (collective, bytes of the whole tensor)
    shared = cfg.moe.n_shared_experts > 0
    for layer_id, again in zip(layer_ids, recomputed):
        forward, backward, repeated = _tp_block_collectives(layer_id >= cfg.n_dense_layers, shared, s.sp)
        sized += [(c, residual) for c in forward + backward + repeated * again]
    if 0 in stages:
        sized.append(("all_reduce", residual))
    if s.sp:
        sized += [("all_gather", residual)] * (len(stages) + sum(stage != s.n_stages - 1 for stage in stages))
    if s.n_stages - 1 in stages:
        sized += [("all_gather", residual), ("reduce_scatter", residual)] if s.sp else [("all_reduce", residual)]
        sized += [("all_reduce", s.tokens * FP32)] * 3 if s.loss_parallel else [("all_gather", s.tokens * vocab * s.act_bytes)]
    if s.fsdp:
        # FSDP2 makes each replicated weight's partial gradient whole before its reduce-scatter: under
        # sequence parallelism the norms' (and the q/k norms', which run on each rank's heads)
        norms = [cfg.d_model] * (2 * len(layer_ids) + (s.n_stages - 1 in stages)) * s.sp
        norms += [cfg.dim_per_head] * (2 * len(layer_ids)) * cfg.qk_norm
        sized += [("all_reduce", numel * s.gathered_bytes) for numel in norms]
    n = s.tp
    moved = sum(RING_PASSES[c] * (n - 1) / n * size for c, size in sized)
    return seconds(moved, sum(RING_PASSES[c] * (n - 1) for c, _ in sized), n)


def _moe_blocks(moe: list[bool], recomputed: list[bool]) -> tuple[int, int]:
    """(MoE blocks, of which recomputed) on this pipeline rank."""
    return sum(moe), sum(r for r, is_moe in zip(recomputed, moe) if is_moe)


def _ep_seconds(cfg, s: LayoutSizes, moe: list[bool], recomputed: list[bool], seconds) -> float:
    """One micro-batch's expert-parallel collectives on this pipeline rank (expert_parallel.py): per MoE
    block's forward an all-to-all of each ep rank's token counts per expert, then the routed rows' dispatch
    and combine (their backward the same two again); where ep spans the tp ranks, each dispatches 1/tp of
    the rows and their results are all-gathered over tp (whose backward gathers the rows' gradients). A
    recomputed block's forward runs them again. Rows leave for the other ranks' experts in proportion to
    their share, and the busiest rank receives (and sends back) s.ep_imbalance times its even share,
    which the all-to-all waits for."""
    n_moe, n_recomputed = _moe_blocks(moe, recomputed)
    routed = s.tokens * cfg.moe.top_k * cfg.d_model * s.act_bytes
    all_to_alls = 4 * n_moe + 2 * n_recomputed
    counts = n_moe + n_recomputed
    gathers = 2 * n_moe + n_recomputed if s.tp > 1 else 0
    moved = (s.ep - 1) / s.ep * (all_to_alls * routed * s.ep_imbalance / s.tp + counts * cfg.moe.n_experts * 8) \
        + gathers * (s.tp - 1) / s.tp * routed
    return seconds(moved, all_to_alls + counts + gathers * (s.tp - 1), s.ep)


def stats_all_reduces(cfg, moe: list[bool], recomputed: list[bool]) -> tuple[int, int]:
    """(count, bytes each) of one micro-batch's routing-statistics all-reduces over the data-parallel
    ranks (router_stats.py): every MoE block's forward reduces its float64 sums (router probabilities
    and routed tokens per expert, the z-loss's, the tokens and the dropped ones), a recomputed block's
    forward again, and its backward their gradient."""
    n_moe, n_recomputed = _moe_blocks(moe, recomputed)
    return 2 * n_moe + n_recomputed, (2 * cfg.moe.n_experts + 3) * 8


def _stats_seconds(cfg, s: LayoutSizes, moe: list[bool], recomputed: list[bool], seconds) -> float:
    """One micro-batch's routing-statistics all-reduces: a few hundred bytes each, which NCCL reduces
    over a tree (log2 of the ranks up, as many down) rather than a ring's 2(dp-1) steps. The forward
    waits for each one before it goes on (the block's auxiliary losses need the global sums)."""
    count, size = stats_all_reduces(cfg, moe, recomputed)
    hops = 2 * math.ceil(math.log2(s.dp))
    return seconds(count * RING_PASSES["all_reduce"] * (s.dp - 1) / s.dp * size, count * hops, s.dp * s.tp)


def _dp_seconds(shapes: ModelShapes, s: LayoutSizes, layer_ids: list[int], n_moe: int, first: bool, last: bool,
                seconds) -> float:
    """FSDP2 on one rank: all-gathers and reduce-scatters of fp32 gradients, and under HSDP an all-reduce
    of the gradient shards over the replicas. Each block, encoder and (under ep) block's experts is a
    unit with its own collectives; the root (token embedding, final norm, output layer) stays gathered
    from forward to backward. Outside a pipeline every micro-batch gathers each unit in forward and
    again in backward and reduce-scatters its gradients; a pipeline stage keeps its weights gathered and
    its gradients unsharded over the step's micro-batches (torch's PipelineStage), so once a step."""
    if not s.fsdp:
        return 0.0
    units = [shapes.layers[i] for i in layer_ids] + [shapes.front[1:]] * first
    root = shapes.front[:1] * first + shapes.back * last
    n_units = len(layer_ids) + shapes.n_encoders * first
    n_expert_units = n_moe if s.ep > 1 else 0
    gathers, rounds = (1, 1) if s.pp > 1 else (2, s.microbatches)
    replicas = s.dp // s.dp_shard
    total = 0.0
    # (experts' tensors?, ranks they are sharded over, units, of which the root)
    for experts, shards, n, n_root in ((False, s.dp_shard, n_units + bool(root), int(bool(root))),
                                       (True, s.dp_shard_out if s.ep > 1 else s.dp_shard, n_expert_units, 0)):
        unit_numel = sum(tensors_numel(unit, s, False, experts) for unit in units)
        root_numel = tensors_numel(root, s, False, experts)
        gathered = gathers * unit_numel + root_numel  # the root is gathered once a round
        moved = (shards - 1) / shards * (gathered * s.gathered_bytes + (unit_numel + root_numel) * FP32)
        n_gathers = gathers * (n - n_root) + n_root
        total += seconds(moved, (n_gathers + n) * (shards - 1), s.dp_shard * s.tp)  # + one reduce-scatter a unit
        if replicas > 1:
            total += seconds(2 * (replicas - 1) / replicas * FP32 * (unit_numel + root_numel) / shards,
                             n * 2 * (replicas - 1), s.dp * s.tp)
    return rounds * total
