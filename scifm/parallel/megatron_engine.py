"""parallel.engine=megatron: scifm's embedding and encoders (scifm modules) feeding Megatron-Core's
GPTModel decoder (scifm.megatron), with scifm's loss, AdamW, schedule and MoE auxiliary losses, so a
run equals the native one; checkpoints stay scifm's layout-free ones under the native names.

Megatron routes (its load balancing is off, scifm.megatron.config); each MoE layer's router output
goes through a MegatronRouting, which computes scifm's load-balance and z-losses and statistics
from the router's own logits and routing map and attaches them to the routing weights' backward.
Tensor (and sequence) and pipeline parallelism come from Megatron's parallel state; a tensor-parallel
weight is cut by Megatron's own partition attributes (partition_dim, partition_stride) from the full
tensor and gathered back whole for checkpoints; under expert parallelism (over the tp ranks) each rank
holds some experts whole. Every step's micro-batches go through Megatron's own schedule (its 1F1B
pipeline for parallel.pp > 1): scifm's embedding and encoders on the first stage, scifm's loss on the
last. Data-parallel replicas average their gradients.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import re
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import loss_parallel
from torch.overrides import TorchFunctionMode

from scifm.core.checks import require
from scifm.core.errors import ConfigError
from scifm.megatron import layouts
from scifm.megatron.build import build_megatron_decoder
from scifm.megatron.config import has_moe_layers, refuse_unsupported
from scifm.megatron.weights import from_megatron, megatron_sources, split_encoders, to_megatron
from scifm.model.attention import document_causal_mask
from scifm.model.config import ModelConfig, MoEConfig
from scifm.model.moe import RoutingStatistics, router_scores, update_expert_bias
from scifm.model.multimodal import ScientificMoE
from scifm.parallel.config import ParallelConfig
from scifm.parallel.distributed import DistContext
from scifm.parallel.grad_norm import clip_grad_norm
from scifm.parallel.pipeline import layer_ranges, merge_stage_moe_stats, sum_over_stages
from scifm.parallel.router_stats import apply_global_router_stats
from scifm.parallel.runner import LossFn, MicroBatch, ModelRunner, TargetLossFn, full_value

MOMENTS = ("exp_avg", "exp_avg_sq")
_EXPERT = re.compile(r"(\.experts\.local_experts\.)(\d+)\.")  # Megatron's local expert index
_LAYER = re.compile(r"^(decoder\.layers\.)(\d+)\.")  # a pipeline stage's local layer index
# Megatron counts each micro-batch's tokens for its own gradient finalisation, which scifm does not use
_NO_TOKENS = torch.zeros((), dtype=torch.int)


def check_megatron(cfg: ParallelConfig, model: ModelConfig, precision: str, device: torch.device) -> None:
    """Before any process group: megatron-core is installed, computes the model, and trains its layout
    in `precision` (trainer.precision) on `device`."""
    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
        raise ConfigError("parallel.engine=megatron: megatron-core is not installed; pip install -e '.[megatron]'")
    refuse_unsupported(model)
    require(cfg.tp == 1 or cfg.sequence_parallel or not has_moe_layers(model), "parallel.sequence_parallel",
            f"Megatron-Core trains MoE layers under tensor parallelism (tp={cfg.tp}) only with sequence parallelism")
    require(precision != "fp8", "trainer.precision",
            "fp8 swaps scifm's decoder linears, which engine=megatron replaces by Megatron's; use bf16 or fp32")
    require(precision != "bf16" or device.type == "cuda", "trainer.precision",
            "Megatron-Core's linear layers follow autocast on CUDA only (their backward runs outside a CPU "
            "autocast and mixes bf16 with fp32); use fp32 on the CPU")


@contextlib.contextmanager
def _quiet():
    """megatron-core warns and logs at import and construction that Transformer Engine and apex are
    absent and it falls back to torch (the local spec asks for exactly those torch modules), which of
    its FSDP variants it would use (scifm uses none), and that its own default CUDA-graph scope is
    deprecated (scifm captures no graphs)."""
    logger = logging.getLogger("megatron")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex|full scope is deprecated).*")
            yield
    finally:
        logger.setLevel(level)


class _CpuForCuda(TorchFunctionMode):
    """Megatron-Core 0.16.1's schedules make their token counter with device="cuda" (their other
    placements ask torch.cuda.current_device, which _patch_megatron points at the CPU); on a CPU
    device, entered around a schedule, that tensor is made on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs.get("device") == "cuda":
            kwargs = kwargs | {"device": "cpu"}
        return func(*args, **kwargs)


def _patch_megatron(device: torch.device) -> None:
    """Megatron-Core 0.16.1's router reads Transformer Engine's te_general_gemm, bound only when TE
    imports; None selects its torch.mm path. Its forward asks for the current CUDA device only to
    place buffers; on a CPU device scifm points it at the CPU, for tests and demos."""
    from megatron.core.transformer.moe import moe_utils

    if not moe_utils.HAVE_TE:
        moe_utils.te_general_gemm = None
    if device.type == "cpu":
        torch.cuda.current_device = lambda: "cpu"


def _expert_layout(ctx: DistContext) -> dict:
    """Megatron's expert parallelism for scifm's parallel.ep (= tp: ParallelConfig): each tp rank holds
    ep-th of the experts whole (expert tensor parallelism 1); Megatron's expert grid puts its ep ranks
    innermost, so they are the tp group's."""
    if ctx.dims.ep == 1:
        return {}
    return dict(expert_model_parallel_size=ctx.dims.ep, expert_tensor_parallel_size=1)


def _schedule_keys(ctx: DistContext, cfg: ParallelConfig, n_layers: int) -> dict:
    """Megatron's config for its schedules: the loss is scifm's summed, already scaled loss (per-token
    mode: Megatron divides by neither tokens nor micro-batches), stages exchange fp32 hidden states
    (the residual stream's dtype, autocast or not), and point-to-point operations are batched on CUDA
    only (Megatron synchronises CUDA after a batch). With parallel.pp > 1 scifm's stages (an even split
    or parallel.pp_split) are Megatron's layout, with the embedding on the first and the loss on the last."""
    keys = dict(calculate_per_token_loss=True, pipeline_dtype=torch.float32, batch_p2p_comm=ctx.device.type == "cuda")
    if ctx.dims.pp > 1:
        stages = [["decoder"] * len(r) for r in layer_ranges(n_layers, ctx.dims.pp, cfg.pp_split)]
        stages[0].insert(0, "embedding")
        stages[-1].append("loss")
        keys.update(pipeline_model_parallel_size=ctx.dims.pp, pipeline_model_parallel_layout=stages)
    return keys


def _init_parallel_state(ctx: DistContext) -> None:
    """Megatron's groups over the process group scifm made (tp innermost and pp outermost, as in scifm's
    mesh); torn down by shutdown(ctx). scifm has no dropout, so no random state is tracked per tp rank."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=ctx.dims.tp,
                                             pipeline_model_parallel_size=ctx.dims.pp, **_expert_layout(ctx),
                                             create_gloo_process_groups=False)
    initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)  # its fork() draws nothing
    ctx.on_shutdown.append(parallel_state.destroy_model_parallel)


class MegatronRouting(RoutingStatistics):
    """scifm's routing statistics and auxiliary losses of one Megatron MoE layer: its router's
    `routing` (logits -> weights, routing map) is wrapped so that each call also computes them from
    the logits and the routing map (the assignments after bias and group limit, as scifm counts)."""

    def __init__(self, router: nn.Module, cfg: MoEConfig):
        super().__init__(cfg)
        self.score_func = cfg.score_func
        self.bias_update_rate = cfg.bias_update_rate
        self.megatron_routing = router.routing  # a bound method, so the router is not a submodule here
        router.routing = self.routing

    def routing(self, logits_SBE: torch.Tensor, padding_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        probs_TE, routing_map_TE = self.megatron_routing(logits_SBE, padding_mask=padding_mask)
        logits_TE = logits_SBE.reshape(-1, self.n_experts).float()
        balance_TE = router_scores(logits_TE, self.score_func)[1]
        probs_TE = self.attach_aux_losses(probs_TE, balance_TE, logits_TE, routing_map_TE.sum(dim=0), 0)
        return probs_TE, routing_map_TE

    def update_bias(self, tokens_per_expert_E: torch.Tensor) -> None:
        router = self.megatron_routing.__self__
        if router.expert_bias is not None:  # softmax routers have none (their rate is 0: config refuses)
            update_expert_bias(router.expert_bias, tokens_per_expert_E, self.bias_update_rate)
            router.local_tokens_per_expert.zero_()  # Megatron's own count, for an update scifm does not run


class MegatronScientificMoE(nn.Module):
    """ScientificMoE's forward with the decoder in Megatron: `front` is the ScientificMoE without its
    decoder, whose token embedding is Megatron's (vocab-parallel) one; its spliced embeddings enter
    the GPTModel as decoder_input [S, B, M]. Under pipeline parallelism `front` is on the first stage
    only (None elsewhere), `decoder` is this rank's stage, and a later stage's input is the hidden
    state that Megatron's schedule receives and hands to the GPTModel (set_input_tensor)."""

    def __init__(self, front: ScientificMoE | None, decoder: nn.Module, routing: list[MegatronRouting],
                 sequence_parallel: bool, vocab_mesh: DeviceMesh | None):
        super().__init__()
        self.front = front
        self.decoder = decoder
        self.routing = nn.ModuleList(routing)
        self.sequence_parallel = sequence_parallel
        self.vocab_mesh = vocab_mesh  # the tp mesh when the logits stay vocab-sharded (parallel.loss_parallel)

    def forward(self, x: torch.Tensor, positions_BS: torch.Tensor, doc_ids_BS: torch.Tensor,
                items: dict | None = None, slot_index: dict | None = None) -> torch.Tensor:
        """Logits [B, S, V]: whole on every tensor-parallel rank, or with a vocab mesh a DTensor of
        each rank's vocabulary shard (which the runner's loss takes under torch's loss_parallel).
        Before the last pipeline stage, the stage's hidden state [S, B, M] (this rank's sequence part
        under sequence parallelism). Megatron's RoPE counts positions 0..S-1; the document mask makes
        that scifm's per-document positions (positions_BS)."""
        from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

        h_SBM = None  # past the first stage: the received hidden state
        if self.front is not None:
            h_SBM = self.front.embed(x, items or {}, slot_index or {}).transpose(0, 1).contiguous()
            if self.sequence_parallel:
                h_SBM = scatter_to_sequence_parallel_region(h_SBM)
        out = self.decoder(x, positions_BS, ~document_causal_mask(doc_ids_BS), decoder_input=h_SBM,
                           runtime_gather_output=self.vocab_mesh is None)
        if self.vocab_mesh is not None and self.decoder.post_process:
            out = DTensor.from_local(out, self.vocab_mesh, [Shard(2)], run_check=False)
        return out


def _global_router_stats(routing: list[MegatronRouting], ctx: DistContext, sequence_parallel: bool) -> None:
    """Each layer's statistics over the global batch: summed over the data-parallel replicas as
    natively (router_stats.py), and under sequence parallelism first over the tp ranks, each of which
    routes its part of the sequence; that sum's backward is the identity, since the routers'
    gradients are summed over the tp ranks afterwards (MegatronRunner.partial_grads)."""
    if ctx.dims.dp_size > 1:
        apply_global_router_stats(nn.ModuleList(routing), ctx.dp_group)
    if sequence_parallel:
        from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

        for r in routing:
            r.reduce_stats = functools.partial(_then, reduce_from_tensor_model_parallel_region, r.reduce_stats)


def _then(first: Callable, second: Callable, t: torch.Tensor) -> torch.Tensor:
    return second(first(t))


def initialize_megatron(model: ScientificMoE, ctx: DistContext, cfg: ParallelConfig, loss_fn: LossFn, autocast,
                        build_optimizer: Callable[[nn.Module], torch.optim.Optimizer]) -> "MegatronRunner":
    """`model` initialised (scifm's init) and whole on every rank; its decoder is rebuilt in Megatron
    with the same weights (this rank's tensor-parallel slices), its embedding and encoders stay.
    `build_optimizer` makes the optimizer over the resulting module's parameters."""
    with _quiet():
        _patch_megatron(ctx.device)
        _init_parallel_state(ctx)
    native_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    native_params = [n for n, _ in model.named_parameters()]
    sequence_parallel = ctx.dims.tp > 1 and cfg.sequence_parallel
    # Megatron's CPU initialisation draws from torch's generator; the run's draws stay the native run's
    with torch.random.fork_rng(devices=[]), _quiet():
        decoder = build_megatron_decoder(model.cfg, model.output.out_features, tensor_model_parallel_size=ctx.dims.tp,
                                         sequence_parallel=sequence_parallel, **_expert_layout(ctx),
                                         **_schedule_keys(ctx, cfg, model.cfg.n_layers))
    front = None  # the embedding and encoders: on the first pipeline stage only
    if decoder.pre_process:
        front = model
        front.tok_embeddings = decoder.embedding.word_embeddings
        # the items are spliced into whole rows; GPTModel, given decoder_input, never calls its embedding
        # itself, which under sequence parallelism would reduce-scatter the rows over the sequence
        front.tok_embeddings.reduce_scatter_embeddings = False
        front.layers, front.norm, front.output = nn.ModuleDict(), None, None
    routing = [MegatronRouting(layer.mlp.router, model.cfg.moe) for layer in decoder.decoder.layers
               if hasattr(layer.mlp, "router")]
    _global_router_stats(routing, ctx, sequence_parallel)
    vocab_mesh = ctx.submesh("tp") if ctx.dims.tp > 1 and cfg.loss_parallel else None
    wrapper = MegatronScientificMoE(front, decoder, routing, sequence_parallel, vocab_mesh).to(ctx.device)
    runner = MegatronRunner(wrapper, model.cfg, loss_fn, autocast, ctx, list(native_state), native_params)
    runner.load_native(native_state)
    runner.optimizer = build_optimizer(wrapper)
    return runner


class MegatronRunner(ModelRunner):
    """ModelRunner over MegatronScientificMoE. A step's micro-batches run through Megatron's schedule;
    after it, the runner completes the gradients Megatron leaves partial (summed over the tp ranks) and
    averages them over the data-parallel replicas; checkpoints hold the native names' full tensors
    (from_megatron / to_megatron, with the AdamW moments mapped as the weights they belong to),
    gathered over the tp, ep and pp ranks. `cfg`: the model's config; `native_names` and
    `native_params`: the native model's state-dict and parameter names."""

    gathers_checkpoint = True

    def __init__(self, model: MegatronScientificMoE, cfg: ModelConfig, loss_fn: LossFn, autocast, ctx: DistContext,
                 native_names: list[str], native_params: list[str]):
        super().__init__(model, loss_fn, autocast, ctx.device)
        from megatron.core import parallel_state

        self.cfg = cfg
        self.optimizer: torch.optim.Optimizer | None = None  # set by initialize_megatron
        self.native_names, self.native_params = native_names, native_params
        self.tp, self.dp, self.ep, self.pp = ctx.dims.tp, ctx.dims.dp_size, ctx.dims.ep, ctx.dims.pp
        self.ep_rank = parallel_state.get_expert_model_parallel_rank() if self.ep > 1 else 0
        self.local_experts = self.cfg.moe.n_experts // self.ep
        self.dp_group = ctx.dp_group
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        assert self.ep == 1 or self.ep_rank == self.tp_rank  # _expert_layout: ep ranks are the tp group's
        self.pp_group = parallel_state.get_pipeline_model_parallel_group() if self.pp > 1 else None
        self.model_parallel_group = parallel_state.get_model_parallel_group()  # tp x pp: what the norm sums over
        layers = model.decoder.decoder.layers
        self.layer_ids = [layer.layer_number - 1 for layer in layers]  # the model's index of each local layer
        self.moe_layer_ids = [i for i, layer in zip(self.layer_ids, layers) if hasattr(layer.mlp, "router")]
        # every parameter once, under Megatron's decoder names or the native encoder names
        self.params = dict(model.decoder.named_parameters())
        if model.front is not None:
            self.params |= {f"encoders.{n}": p for n, p in model.front.encoders.named_parameters()}
        assert len(self.params) == len(list(model.parameters()))
        # decoder weights every tp rank holds whole but computes a part of the gradient of, which
        # Megatron's finalize_model_grads would sum: the q/k norms (this rank's heads) and, under
        # sequence parallelism, every norm and router (this rank's tokens)
        self.partial_grads = [p for n, p in model.decoder.named_parameters() if self.tp > 1
                              and not getattr(p, "tensor_model_parallel", False)
                              and (model.sequence_parallel or "q_layernorm" in n or "k_layernorm" in n)]

    # --- Megatron's schedule --------------------------------------------------------------------

    def _schedule(self, micro: list[MicroBatch], loss: Callable, forward_only: bool) -> list:
        """The micro-batches through Megatron's schedule for this layout (1F1B across the pp ranks, or
        one after the other without a pipeline); `loss(labels_BS, logits_BSV)` gives (the tensor to
        backpropagate, what to return). Returns what the last stage's losses returned, [] elsewhere."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        batches = iter([b.to(self.device) for b in micro])

        def forward_step(data, decoder):
            batch = next(data)
            with self.autocast:
                out = self.model(batch.input_ids, **batch.model_kwargs())

            def reduce(logits_BSV):
                backpropagated, returned = loss(batch.labels, logits_BSV)
                return backpropagated, _NO_TOKENS, returned

            return out, reduce

        rows, seq_len = micro[0].input_ids.shape
        # the last stage computes and backpropagates its loss inside the schedule
        vocab_sharded = self.model.vocab_mesh is not None and self.model.decoder.post_process
        with loss_parallel() if vocab_sharded else contextlib.nullcontext(), \
                _CpuForCuda() if self.device.type == "cpu" else contextlib.nullcontext():
            return get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=batches, model=self.model.decoder,
                num_microbatches=len(micro), seq_length=seq_len, micro_batch_size=rows, forward_only=forward_only)

    def _over_stages(self, mine: torch.Tensor) -> torch.Tensor:
        """Only the last pipeline stage has losses (the others give zeros): summed over the pp ranks."""
        return mine if self.pp == 1 else sum_over_stages(mine, self.device, self.pp_group)

    def forward_backward(self, micro: list[MicroBatch], scale: float) -> torch.Tensor:
        def train_loss(labels_BS, logits_BSV):
            loss = self.loss_fn(logits_BSV, labels_BS, scale)
            return loss, loss.detach()

        losses = self._schedule(micro, train_loss, forward_only=False)
        total = self._over_stages(torch.tensor(sum(float(full_value(loss)) for loss in losses), dtype=torch.float64))
        for p in self.partial_grads:
            if p.grad is not None:
                dist.all_reduce(p.grad, group=self.tp_group)
        if self.dp > 1:
            self._average_over_replicas()
        return total

    @torch.no_grad()
    def target_losses(self, batch: MicroBatch, loss_fn: TargetLossFn) -> torch.Tensor:
        def target_loss(labels_BS, logits_BSV):
            losses_BS = loss_fn(logits_BSV, labels_BS)
            return losses_BS, losses_BS

        out = self._schedule([batch], target_loss, forward_only=True)
        mine = full_value(out[0]).double().cpu() if out else torch.zeros(batch.labels.shape, dtype=torch.float64)
        return self._over_stages(mine)

    def gather_moe_stats(self, stats: list[dict]) -> list[dict]:
        return stats if self.pp == 1 else merge_stage_moe_stats(stats, self.moe_layer_ids, self.pp_group)

    def _average_over_replicas(self) -> None:
        """Plain data parallelism: every gradient averaged over the replicas (the loss scale counts
        on that, scifm.train.step), in one all-reduce; a parameter no replica's batch reached keeps
        no gradient, as in one process."""
        params = list(self.params.values())
        reached = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=self.device)
        dist.all_reduce(reached, op=dist.ReduceOp.MAX, group=self.dp_group)
        params = [p for p, r in zip(params, reached.tolist()) if r]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        dist.all_reduce(flat, group=self.dp_group)
        flat /= self.dp
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad = g.view_as(p).clone()

    def clip_grad_norm(self, max_norm: float) -> float:
        """The norm counts a tensor-parallel slice on every tp rank, a replicated tensor once, and each
        pipeline stage's own tensors."""
        if self.tp == 1 and self.pp == 1:
            return super().clip_grad_norm(max_norm)
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

        counted = [p for p in self.params.values() if param_is_not_tensor_parallel_duplicate(p, self.tp_group)]
        return float(clip_grad_norm(self.params.values(), max_norm, self.model_parallel_group, counted))

    # --- full tensors <-> this rank's -----------------------------------------------------------

    def _sliced(self, name: str, param: torch.Tensor | None) -> bool:
        """Whether this rank holds a tensor-parallel slice of `name` (expert weights are whole under ep)."""
        return self.tp > 1 and getattr(param, "tensor_model_parallel", False) and not (
            self.ep > 1 and _EXPERT.search(name))

    def _global_name(self, name: str, ep_rank: int | None = None) -> str:
        """The whole model's name of a local tensor: a pipeline stage's local layer i is layer
        layer_ids[i], and local expert i of ep rank r is expert r * E / ep + i."""
        rank = self.ep_rank if ep_rank is None else ep_rank
        name = _LAYER.sub(lambda m: f"{m[1]}{self.layer_ids[int(m[2])]}.", name)
        return _EXPERT.sub(lambda m: f"{m[1]}{rank * self.local_experts + int(m[2])}.", name)

    def _whole(self, local: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
        """Collective: the whole model's tensors (CPU) from this rank's (Megatron's local names and the
        encoders'): tensor-parallel slices gathered over tp, experts over ep, stages over pp."""
        out = {}
        for name, t in local.items():
            param = self.params.get(name)
            if t is None:
                out[self._global_name(name)] = None
            elif self.ep > 1 and _EXPERT.search(name):
                parts = self._all_gather(t.detach(), self.ep)
                out.update({self._global_name(name, r): part for r, part in enumerate(parts)})
            elif self._sliced(name, param):
                out[self._global_name(name)] = layouts.unshard(self._all_gather(t.detach(), self.tp),
                                                               param.partition_dim, param.partition_stride)
            else:
                out[self._global_name(name)] = t.detach().cpu()
        if self.pp > 1:  # each stage holds its own layers, the first the embedding and encoders, the last the output
            stages: list = [None] * self.pp
            dist.all_gather_object(stages, out, group=self.pp_group)
            out = {name: t for stage in stages for name, t in stage.items()}
        return out

    def _all_gather(self, t: torch.Tensor, size: int) -> list[torch.Tensor]:
        # the ep ranks are the tp group's (_expert_layout)
        parts = [torch.empty_like(t) for _ in range(size)]
        dist.all_gather(parts, t.contiguous(), group=self.tp_group)
        return [p.cpu() for p in parts]

    def _mine(self, whole: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        """This rank's part of `name` (a local name) from the whole model's tensors."""
        t, param = whole[self._global_name(name)], self.params.get(name)
        if not self._sliced(name, param):
            return t
        return layouts.shard(t, param.partition_dim, param.partition_stride, self.tp_rank, self.tp)

    def _whole_state(self) -> tuple[dict, dict]:
        """Collective: (Megatron's decoder state (parameters and buffers), the encoders'), whole."""
        local = self.model.decoder.state_dict()
        if self.model.front is not None:
            local |= {f"encoders.{k}": v for k, v in self.model.front.encoders.state_dict().items()}
        return split_encoders(self._whole(local))

    def load_native(self, state: dict) -> None:
        """Weights and buffers from a native state dict (full tensors under the native names)."""
        decoder_state, encoders = split_encoders(state)
        whole = to_megatron(decoder_state, self.cfg)
        local = {k: self._mine(whole, k) for k in self.model.decoder.state_dict() if not k.endswith("._extra_state")}
        self.model.decoder.load_state_dict(local, strict=True)
        if self.model.front is not None:
            self.model.front.encoders.load_state_dict(
                {k.removeprefix("encoders."): v for k, v in encoders.items()}, strict=True)

    def _native_moments(self, megatron_state: dict, key: str) -> dict[str, torch.Tensor]:
        """The AdamW moment `key` of every native parameter: Megatron's mapped as its weights are
        (the buffers ride along only to complete the mapping's input)."""
        moments = {name: self.optimizer.state.get(p, {}).get(key, torch.zeros_like(p)) for name, p in self.params.items()}
        decoder_moments, encoders = split_encoders(self._whole(moments))
        native = from_megatron(megatron_state | decoder_moments, self.cfg) | encoders
        return {n: native[n] for n in self.native_params}

    # --- checkpoints in the native format -------------------------------------------------------

    def checkpoint_states(self) -> tuple[dict, dict, list]:
        """Collective: full weights and AdamW moments under the native names; each rank keeps every
        world_size-th tensor, and the ranks' tensors together are the checkpoint."""
        rank, world = dist.get_rank(), dist.get_world_size()
        megatron_state, encoders = self._whole_state()
        model_state = from_megatron(megatron_state, self.cfg) | encoders
        moments = {key: self._native_moments(megatron_state, key) for key in MOMENTS}
        step = torch.tensor(max((float(s["step"]) for s in self.optimizer.state.values()), default=0.0))
        model_state = {n: t.clone() for i, (n, t) in enumerate(sorted(model_state.items())) if i % world == rank}
        optim = {}
        for i, name in enumerate(self.native_params):
            if i % world == rank:
                optim.update({f"{name}::{key}": moments[key][name].clone() for key in MOMENTS})
                optim[f"{name}::step"] = step.clone()
        return model_state, optim, self._param_groups()

    def _param_groups(self) -> list[dict]:
        """The optimizer's param groups under the native names of their parameters."""
        sources = megatron_sources(self.cfg)
        names = {id(p): self._global_name(n) for n, p in self.params.items()}
        groups = []
        for group in self.optimizer.param_groups:
            members = {names[id(p)] for p in group["params"]}
            native = [n for n in self.native_params if n in members or set(sources.get(n, ())) & members]
            groups.append({k: v for k, v in group.items() if k != "params"} | {"params": native})
        return groups

    def load_checkpoint_states(self, read: Callable[[str, list[str]], dict[str, torch.Tensor]],
                               hyperparameters: list[dict]) -> None:
        """Collective: `read(sub, names)` gives the saved full tensors; weights, buffers, AdamW moments
        and step go into this rank's slices, and `hyperparameters` replace the param groups' own.
        Reads the whole model at once (the mapping fuses tensors of one layer)."""
        from torch.distributed.checkpoint.state_dict import _init_optim_state

        native = read("model", self.native_names)
        self.load_native(native)
        saved = read("optimizer", [f"{n}::{k}" for n in self.native_params for k in (*MOMENTS, "step")])
        _init_optim_state(self.optimizer)  # AdamW makes its state at its first step; here, zeros to fill
        step_like = next(iter(self.optimizer.state.values()))["step"]
        for p in self.params.values():  # one no batch has reached yet (an absent modality's encoder)
            if "step" not in self.optimizer.state[p]:
                self.optimizer.state[p].update(step=step_like.clone(), exp_avg=torch.zeros_like(p),
                                               exp_avg_sq=torch.zeros_like(p))
        for key in MOMENTS:
            moments = native | {n: saved[f"{n}::{key}"] for n in self.native_params}
            if self.cfg.tie_embeddings:  # the native optimizer holds the tied matrix once
                moments["output.weight"] = moments["tok_embeddings.weight"]
            decoder_moments, encoders = split_encoders(moments)
            megatron = to_megatron(decoder_moments, self.cfg) | encoders
            for name, p in self.params.items():
                self.optimizer.state[p][key].copy_(self._mine(megatron, name))
        step = max(float(saved[f"{n}::step"]) for n in self.native_params)
        for state in self.optimizer.state.values():
            state["step"].fill_(step)
        for group, hyper in zip(self.optimizer.param_groups, hyperparameters):
            group.update(hyper)
