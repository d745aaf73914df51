"""Bytes one GPU holds under a layout, per pipeline rank (the planner reports the fullest one).

Parameters, gradients and optimizer state follow the code that shards them: tensor parallelism
splits the dimension tensor_parallel.py's plan names, expert parallelism splits the stacked experts
E / ep, and FSDP2 splits dimension 0 of what is left over dp_shard (the experts, under ep, over
dp_shard_out), giving rank 0 ceil(rows / shards) rows. Weights stay fp32 whatever
parallel.mixed_precision says (FSDP2 casts only the gathered copy), gradients are fp32, AdamW keeps
two fp32 moments per weight.

Activations: bytes per token of each block, counted from the tensors autograd saves in the model's
code (ACTIVATION_BYTES; tests/test_plan.py re-counts them on a block), scaled by the layout: tp
divides the attention heads, the FFN and shared-expert widths, and the routed experts' work where
ep spans the tp ranks; sequence parallelism divides the norms' part of the residual width;
activation checkpointing keeps only a block's input; a pipeline rank holds several micro-batches in
flight. The modality encoders' activations (first stage) are measured on the run's own data where a
tokenizer is given (encoder_load.py); without one they are left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from scifm.config import RunConfig
from scifm.model.cross_entropy import chunk_rows
from scifm.model.flops import keys_visited
from scifm.parallel.fsdp import recomputes
from scifm.parallel.pipeline import layer_ranges, stages_of_rank
from scifm.plan.encoder_load import EncoderSampler
from scifm.plan.layouts import Layout
from scifm.plan.shapes import ModelShapes, Tensor

FP32 = 4

# Bytes per token saved for backward by one decoder block, per unit of each width, in the two
# regimes the code runs: fp32 (weights and compute in fp32) and bf16 (bf16 weights under bf16
# autocast, i.e. FSDP2 with parallel.mixed_precision=bf16). Units: resid per d_model, attn per
# n_heads x head_dim, head per head, mask per key an SDPA call gives a query (the boolean document
# mask becomes a bias of the compute dtype in every layer's attention), blocks per n_heads x head_dim
# where attention runs over blocks of queries (their outputs, which SDPA keeps, are joined into a
# copy that the output projection keeps; one call's output is kept once), ffn per ffn_hidden, router
# per expert, routed_* per chosen expert (top_k) and per d_model / expert_ffn, shared per
# shared-expert width.
ACTIVATION_BYTES = {
    "fp32": dict(resid=24, attn=16, head=4, mask=4, blocks=4, ffn=16, router=8, routed_d=12, routed_f=16,
                 routed=28, shared=16, dense=8, moe=20),
    "bf16": dict(resid=16, attn=8, head=4, mask=2, blocks=2, ffn=8, router=8, routed_d=6, routed_f=8,
                 routed=26, shared=8, dense=8, moe=20),
}
# of the residual-width bytes, the share held on sequence shards under sequence parallelism (each
# norm's input and fp32 output); the rest (the gathered inputs of attention and the FFN) is whole
SP_SHARDED_RESID = 2 / 3


@dataclass
class MemoryBreakdown:
    """Bytes on one GPU (the fullest pipeline rank); `detail` names what makes up activations and buffers."""

    params: int
    grads: int
    optimizer: int
    activations: int
    buffers: int
    pp_rank: int
    # whether the gradients of earlier micro-batches exist while a micro-batch's activations are all
    # held: yes where a backward runs before the last forward (gradient accumulation, 1F1B past its
    # warm-up); no where every micro-batch runs forward first (one micro-batch, GPipe, a pipeline rank
    # whose warm-up covers them all), since backward then frees activations as it makes gradients
    grads_meet_activations: bool = True
    detail: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.params + self.optimizer + self.step_peak

    @property
    def step_peak(self) -> int:
        """What a step allocates above the weights and optimizer state: memory.json's step_peak_bytes."""
        held = self.grads + self.activations if self.grads_meet_activations else max(self.grads, self.activations)
        return held + self.buffers

    def parts(self) -> dict[str, int]:
        return {"params": self.params, "grads": self.grads, "optimizer": self.optimizer,
                "activations": self.activations, "buffers": self.buffers}


def compute_dtype(run: RunConfig) -> str:
    """The matmuls' dtype on a GPU: trainer.precision auto is bf16 there (fp8 runs the rest in bf16)."""
    return {"auto": "bf16", "bf16": "bf16", "fp8": "fp8", "fp32": "fp32"}[run.trainer.precision]


def activation_regime(run: RunConfig, layout: Layout) -> str:
    """fp32 or bf16: FSDP's bf16 parameters compute in bf16 even without autocast (it casts the inputs)."""
    low = compute_dtype(run) != "fp32" or (layout.dims.fsdp and layout.parallel.mixed_precision == "bf16")
    return "bf16" if low else "fp32"


def weight_copies(run: RunConfig, layout: Layout) -> bool:
    """bf16 compute over fp32 weights: autocast (and the experts' own cast) makes a bf16 copy of every
    weight a forward uses, which backward needs, so it lives from a block's forward to its backward."""
    return compute_dtype(run) != "fp32" and not (layout.dims.fsdp and layout.parallel.mixed_precision == "bf16")


class LayoutSizes:
    """Sizes of this layout that every formula below reads."""

    def __init__(self, run: RunConfig, layout: Layout, ep_imbalance: float = 1.0):
        d = layout.dims
        # the busiest ep rank's routed rows over an even share (routing_load.py); 1 without ep
        self.ep_imbalance = ep_imbalance if d.ep > 1 else 1.0
        self.tp, self.ep, self.pp, self.dp = d.tp, d.ep, d.pp, d.dp_size
        self.dp_shard, self.dp_shard_out = d.dp_shard, d.dp_shard_out
        self.fsdp = layout.dims.fsdp
        self.sp = layout.parallel.sequence_parallel and d.tp > 1
        self.loss_parallel = layout.parallel.loss_parallel and d.tp > 1
        self.rows = run.trainer.batch_size // d.dp_size  # rows of one micro-batch on a data-parallel rank
        self.seq = run.data.seq_len
        self.tokens = self.rows * self.seq
        self.microbatches = run.trainer.grad_accum
        self.virtual = layout.parallel.pp_virtual_stages if d.pp > 1 else 1
        self.schedule = layout.parallel.pp_schedule
        self.n_stages = d.pp * self.virtual
        self.split = list(layout.parallel.pp_split)
        self.ac = layout.parallel.activation_checkpoint
        self.regime = activation_regime(run, layout)
        self.act_bytes = 2 if self.regime == "bf16" else FP32
        self.gathered_bytes = 2 if self.fsdp and layout.parallel.mixed_precision == "bf16" else FP32
        self.weight_copies = weight_copies(run, layout)


def encoder_regime(s: LayoutSizes) -> str:
    """How the encoders compute: fp32, bf16 under autocast over fp32 weights, or FSDP2's bf16 weights."""
    return "fp32" if s.regime == "fp32" else "bf16_autocast" if s.weight_copies else "bf16_weights"


def local_numel(t: Tensor, s: LayoutSizes, sharded: bool) -> int:
    """Elements of `t` on tp rank 0 / dp rank 0: after tp and ep, and after FSDP when `sharded`."""
    shape = list(t.shape)
    if t.expert and s.ep > 1:
        shape[0] //= s.ep
    if t.tp_dim is not None and s.tp > 1:
        shape[t.tp_dim] //= s.tp
    if sharded and s.fsdp and shape:
        shards = s.dp_shard_out if t.expert and s.ep > 1 else s.dp_shard
        shape[0] = math.ceil(shape[0] / shards)  # torch.chunk: the first ranks get the larger pieces
    return math.prod(shape)


_NUMEL_CACHE: dict[tuple, tuple[tuple[Tensor, ...], int]] = {}


def tensors_numel(tensors: tuple[Tensor, ...], s: LayoutSizes, sharded: bool, experts: bool | None = None) -> int:
    """Summed local_numel (of the expert tensors only, or of the others, when `experts` says so);
    cached per tuple (ModelShapes' front, back and each layer's) and the sizes that decide it, since
    thousands of layouts ask about the same few tuples. The entry keeps its tuple, so a new tuple that
    reuses a dead one's id is never served the old sum."""
    key = (id(tensors), experts, s.tp, s.ep, s.fsdp and sharded, s.dp_shard, s.dp_shard_out)
    entry = _NUMEL_CACHE.get(key)
    if entry is None or entry[0] is not tensors:
        total = sum(local_numel(t, s, sharded) for t in tensors if experts is None or t.expert == experts)
        entry = _NUMEL_CACHE[key] = (tensors, total)
    return entry[1]


def layers_numel(shapes: ModelShapes, layer_ids: list[int], s: LayoutSizes, sharded: bool) -> int:
    return sum(tensors_numel(shapes.layers[i], s, sharded) for i in layer_ids)


def block_activation_bytes(shapes: ModelShapes, layer_id: int, s: LayoutSizes) -> float:
    """Bytes one block saves for backward per micro-batch on this rank, without checkpointing."""
    cfg, c = shapes.cfg, ACTIVATION_BYTES[s.regime]
    resid = c["resid"] * cfg.d_model
    if s.sp:
        resid = resid * SP_SHARDED_RESID / s.tp + resid * (1 - SP_SHARDED_RESID)
    blocks = 0 < cfg.attention_query_block < s.seq
    attn = c["attn"] + (c["blocks"] if blocks else 0)
    per_token = (resid + (attn * cfg.n_heads * cfg.dim_per_head + c["head"] * cfg.n_heads) / s.tp
                 + c["mask"] * keys_visited(s.seq, cfg.attention_query_block))
    if layer_id < cfg.n_dense_layers:
        per_token += c["ffn"] * cfg.ffn_hidden / s.tp + c["dense"]
    else:
        moe = cfg.moe
        routed = moe.top_k * (c["routed_d"] * cfg.d_model + c["routed_f"] * moe.expert_ffn + c["routed"])
        # routed experts run whole on every tp rank unless ep spans tp (each tp rank then sends 1/tp);
        # under ep the busiest rank holds its larger share of the rows
        per_token += (c["router"] * moe.n_experts + routed * s.ep_imbalance / (s.tp if s.ep > 1 else 1)
                      + c["shared"] * moe.n_shared_experts * moe.expert_ffn / s.tp + c["moe"])
    return per_token * s.tokens


def in_flight(s: LayoutSizes, pp_rank: int) -> int:
    """Micro-batches whose activations a pipeline rank holds at once (per stage it runs): all of them
    under GPipe, at most pp - rank under 1F1B; the interleaved and zero-bubble schedules' warm-up
    holds (v - 1) x pp + 2 x (pp - 1 - rank) + 1 stage-chunks, spread over the rank's v stages."""
    m = s.microbatches
    if s.pp == 1:
        return 1
    if s.schedule == "GPipe":
        return m
    if s.virtual == 1:
        return min(m, s.pp - pp_rank)
    chunks = min(m * s.virtual, (s.virtual - 1) * s.pp + 2 * (s.pp - 1 - pp_rank) + 1)
    return math.ceil(chunks / s.virtual)


def memory_breakdown(shapes: ModelShapes, run: RunConfig, layout: Layout,
                     encoders: EncoderSampler | None = None, ep_imbalance: float = 1.0) -> MemoryBreakdown:
    s = LayoutSizes(run, layout, ep_imbalance)
    ranges = layer_ranges(shapes.cfg.n_layers, s.n_stages, s.split)
    per_rank = []
    for pp_rank in range(s.pp):
        stages = stages_of_rank(pp_rank, s.pp, s.virtual, s.schedule) if s.pp > 1 else [0]
        layer_ids = [i for st in stages for i in ranges[st]]
        first, last = 0 in stages, s.n_stages - 1 in stages
        per_rank.append(_rank_breakdown(shapes, s, pp_rank, layer_ids, first, last, encoders))
    return max(per_rank, key=lambda b: b.total)


def _rank_breakdown(shapes: ModelShapes, s: LayoutSizes, pp_rank: int, layer_ids: list[int], first: bool,
                    last: bool, encoders: EncoderSampler | None) -> MemoryBreakdown:
    cfg = shapes.cfg
    params = FP32 * (layers_numel(shapes, layer_ids, s, sharded=True) + tensors_numel(shapes.front, s, True) * first
                     + tensors_numel(shapes.back, s, True) * last)

    detail: dict[str, int] = {}
    per_kind = {moe: block_activation_bytes(shapes, shapes.cfg.n_dense_layers if moe else 0, s)
                for moe in {i >= cfg.n_dense_layers for i in layer_ids}}  # dense and MoE blocks differ, nothing else
    blocks = [per_kind[i >= cfg.n_dense_layers] for i in layer_ids]
    block_input = s.tokens * cfg.d_model * (FP32 if s.regime == "fp32" or s.weight_copies else 2)
    kept = []
    for k, b in enumerate(blocks):  # checkpointing wraps blocks by their index within the stage part
        kept.append(block_input if recomputes(s.ac, k) else b)
    flight = in_flight(s, pp_rank)
    detail["blocks"] = int(sum(kept) * flight)
    if s.ac != "none" and blocks:
        detail["recompute"] = int(max(blocks))  # one checkpointed block's activations while its backward runs
    if s.weight_copies:
        share = 0.0 if s.ac == "full" else 0.5 if s.ac == "selective" else 1.0
        block_weights = layers_numel(shapes, layer_ids, s, sharded=False)
        detail["bf16_weight_copies"] = int(2 * block_weights * share * flight)
    rotary = cfg.rotary_dim
    detail["mask_and_rope"] = int(flight * (s.rows * s.seq * s.seq + 2 * FP32 * s.tokens * rotary))
    if first:
        detail["embeddings"] = int(flight * 2 * FP32 * s.tokens * cfg.d_model)
        if encoders is not None:  # never checkpointed; whole on every tp rank (each holds its rows' items)
            detail["encoders"] = flight * encoders.load(s.dp, encoder_regime(s)).saved_bytes
    if last:
        detail["logits"] = int(_loss_bytes(shapes.vocab, s, flight))
    activations = sum(detail.values())

    buffers: dict[str, int] = {}
    largest_block = max((tensors_numel(shapes.layers[i], s, sharded=False) for i in layer_ids), default=0)
    if s.fsdp:
        # FSDP2 keeps the root unit (token embedding, final norm, output layer: what no block or
        # encoder holds) gathered from forward to backward
        root = shapes.front[:1] * first + shapes.back * last
        stage_blocks = layers_numel(shapes, layer_ids, s, sharded=False) if s.pp > 1 else 0
        # at the peak the activations set (the last micro-batch's loss backward, before any block's
        # backward gathers it): the root (a pipeline stage keeps all of its blocks gathered too)
        buffers["fsdp_gathered_weights"] = s.gathered_bytes * (
            sum(local_numel(t, s, sharded=False) for t in root) + stage_blocks)
        # later, in a block's backward: the block and the next, prefetched, gathered; the block's
        # unsharded gradients and the flat reduce-scatter input they are copied into before being
        # freed. The loss's tensors are freed by then, so only what exceeds them raises the peak
        later = s.gathered_bytes * 2 * largest_block * (s.pp == 1) + 2 * FP32 * largest_block
        buffers["fsdp_backward_excess"] = max(0, later - detail.get("logits", 0))
    if s.pp > 1:
        buffers["pp_send_recv"] = 2 * s.virtual * s.tokens * cfg.d_model * s.act_bytes
    detail.update(buffers)
    grads = params
    if first and s.tp > 1 and not s.fsdp:
        # measured (memory.json, tp=2): the vocabulary-parallel embedding's gradient is held whole on
        # every tp rank; FSDP's reduce-scatter shards it again
        embedding = shapes.front[0]
        grads += FP32 * (embedding.numel - local_numel(embedding, s, sharded=False))
    return MemoryBreakdown(params=params, grads=grads, optimizer=2 * params, activations=activations,
                           buffers=sum(buffers.values()), pp_rank=pp_rank,
                           grads_meet_activations=flight < s.microbatches, detail=detail)


def _loss_bytes(vocab: int, s: LayoutSizes, flight: int) -> float:
    """The logits and what the loss holds of them at its peak, with the micro-batches in flight."""
    if s.loss_parallel:
        vocab //= s.tp
        # torch's cross-entropy, at its backward: log-softmax's output and the fp32 gradients with
        # respect to it and to the logits, and for bf16 logits that gradient cast back; loss
        # parallelism's backward (DTensor's fused nll_loss and log-softmax backward) holds one more
        # tensor of the vocabulary shard's size (measured, tp=2). The logits themselves are gone by
        # then (the runner drops them once the loss is made; measured, tp=2). Each other micro-batch
        # in flight keeps its logits (the stage's output) and the fp32 log-softmax output the loss saves
        per_entry = FP32 * 4 + (s.act_bytes if s.act_bytes != FP32 else 0) + (flight - 1) * (s.act_bytes + FP32)
        return s.tokens * vocab * per_entry
    # the chunked cross-entropy, in its forward: the logits, the gradient buffer (both in the logits'
    # dtype) and one chunk's fp32 log-softmax (and, for bf16 logits, the fp32 copy it reads them from);
    # its backward holds less (the runner has dropped the logits). Each other micro-batch in flight
    # keeps its logits (the stage's output) and its gradient buffer
    chunk = min(s.tokens, chunk_rows(vocab)) * vocab * FP32 * (1 if s.act_bytes == FP32 else 2)
    return s.tokens * vocab * 2 * s.act_bytes * flight + chunk
