"""parallel.engine=deepspeed: DeepSpeed ZeRO (stages 1-3, CPU offload) over the same ScientificMoE,
with scifm's optimizer, schedule, loss scaling and router statistics, so a run equals the native
one-process run; checkpoints stay scifm's layout-free ones (gathered from and scattered into
DeepSpeed's partitions), so they move between engines and layouts.

Expert parallelism (parallel.ep > 1, ZeRO 1/2): scifm's own routing and all-to-all dispatch
(expert_parallel.py) hold E / ep experts per rank; their parameters are marked as DeepSpeed marks
its own MoE layers' (`allreduce=False`, `group_name`) and sit in an optimizer param group of their
own, so ZeRO partitions and reduces them over the expert-data-parallel ranks (those holding the
same experts) and every other parameter over all ranks. Checkpoints gather the experts over the
ep group into whole tensors and give each rank its block back on load.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from scifm.core.errors import ConfigError
from scifm.parallel.parallelize import apply_recompute_and_compile
from scifm.parallel.runner import LossFn, ModelRunner

_WRAPPER_PREFIX = re.compile(r"(_checkpoint_wrapped_module|_orig_mod)\.")
LOAD_CHUNK = 16  # parameters read and scattered at a time when loading (bounds the host memory)
# the LambdaLR state's lists with one entry per optimizer param group
SCHEDULE_PER_GROUP = ("base_lrs", "_last_lr", "lr_lambdas")


def deepspeed_config(zero_stage: int, offload_optimizer: bool, offload_params: bool, user_path: str,
                     micro_batch: int, grad_accum: int, grad_clip: float, experts: bool = False) -> dict:
    """What scifm derives from its own keys, merged with the user's JSON; a key both set differently
    is a one-line error naming it (DeepSpeed's own defaults, e.g. gradient_clipping=1.0, never apply).
    `experts`: expert parallelism, whose gradients ZeRO 1/2 reduce over their own group only on the
    contiguous reduce-scatter path (the other path all-reduces every gradient over all ranks)."""
    zero: dict = {"stage": zero_stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if offload_params:
        zero["offload_param"] = {"device": "cpu"}
    if experts:
        zero |= {"contiguous_gradients": True, "reduce_scatter": True}
    derived = {
        "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip, "zero_optimization": zero, 
        "managed_gradient_accumulation": False, "steps_per_print": 2**31 - 1,
    }
    if experts:  # DeepSpeed's expert groups laid out as scifm's mesh lays out the ep ranks (innermost)
        derived["use_data_before_expert_parallelism"] = False
    if not user_path:
        return derived
    try:
        user = json.loads(Path(user_path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"parallel.deepspeed.config: cannot read {user_path} ({err})") from None
    return _merge(derived, user, "")


def _merge(derived: dict, user: dict, prefix: str) -> dict:
    out = dict(user)
    for key, value in derived.items():
        if key not in user:
            out[key] = value
        elif isinstance(value, dict) and isinstance(user[key], dict):
            out[key] = _merge(value, user[key], f"{prefix}{key}.")
        elif user[key] != value:
            raise ConfigError(f"parallel.deepspeed.config: {prefix}{key}={user[key]!r} disagrees with scifm's "
                              f"{value!r}; set it through scifm's keys or drop it from the JSON")
    return out


def named_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Parameters under the checkpoint's names: without the prefixes that the activation
    checkpointing and torch.compile wrappers add."""
    return {_WRAPPER_PREFIX.sub("", n): p for n, p in module.named_parameters()}


def state_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict under the checkpoint's names (its tensors share the module's storage)."""
    return {_WRAPPER_PREFIX.sub("", n): t for n, t in module.state_dict().items()}


def require_deepspeed() -> None:
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("parallel.engine=deepspeed: DeepSpeed is not installed; pip install -e '.[deepspeed]'")


def deepspeed_optimizer(optimizer: torch.optim.AdamW, cfg,
                        expert_group: str = "") -> tuple[torch.optim.Optimizer, list[int]]:
    """`optimizer` (AdamW over the model's parameters) as DeepSpeed takes it, and for each of its
    param groups the index of the group of `optimizer` it came from. With `expert_group` (the name
    of DeepSpeed's expert groups), the expert parameters of each group move to a group of their own,
    marked `moe` and named after their expert group, as ZeRO requires. With the optimizer offloaded,
    DeepSpeed's CPU AdamW (its vectorised host kernel, the same update up to float32 rounding) over
    the same parameter groups; else `optimizer` itself."""
    origin = list(range(len(optimizer.param_groups)))
    if expert_group:
        split = []
        for i, group in enumerate(optimizer.param_groups):
            experts = [p for p in group["params"] if getattr(p, "group_name", None) == expert_group]
            group["params"] = [p for p in group["params"] if getattr(p, "group_name", None) != expert_group]
            if experts:
                split.append((i, {k: v for k, v in group.items() if k != "params"}
                              | {"params": experts, "moe": True, "name": expert_group}))
        for i, group in split:
            optimizer.add_param_group(group)
            origin.append(i)
    if not cfg.offload_optimizer:
        return optimizer, origin
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    groups = [{k: g[k] for k in ("params", "weight_decay", "moe", "name") if k in g} for g in optimizer.param_groups]
    defaults = optimizer.defaults
    return DeepSpeedCPUAdam(groups, lr=defaults["lr"], betas=defaults["betas"], eps=defaults["eps"],
                            adamw_mode=True), origin


def native_schedule_state(state: dict, origin: list[int]) -> dict:
    """A schedule's state over DeepSpeed's param groups (`origin[j]`: the native group group j came
    from) with one entry per native group: that of the first group that came from it."""
    return state | {key: [state[key][origin.index(k)] for k in range(max(origin) + 1)] for key in SCHEDULE_PER_GROUP}


def deepspeed_schedule_state(state: dict, origin: list[int]) -> dict:
    """The inverse: each of DeepSpeed's groups takes its native group's entry."""
    return state | {key: [state[key][k] for k in origin] for key in SCHEDULE_PER_GROUP}


@dataclass(frozen=True)
class ExpertShards:
    """Which parameters hold only this rank's block (dim 0) of a tensor the checkpoint holds whole:
    the experts under expert parallelism, of which rank r of the ep `group` holds block r."""

    names: frozenset[str] = frozenset()
    group: dist.ProcessGroup | None = None

    def whole(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Collective over the ep group for an expert parameter: the whole tensor from every rank's block."""
        if name not in self.names:
            return t
        blocks = [torch.empty_like(t) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(blocks, t.contiguous(), group=self.group)
        return torch.cat(blocks)

    def part(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of the whole saved tensor."""
        if name not in self.names:
            return full
        return full.chunk(dist.get_world_size(self.group))[dist.get_rank(self.group)]


def apply_deepspeed_expert_parallel(model: nn.Module, ctx) -> tuple[ExpertShards, str]:
    """Expert parallelism over ctx's ep mesh (before deepspeed.initialize): scifm's dispatch with
    plain local expert weights, marked for ZeRO as DeepSpeed marks its own experts. Returns the
    shards and the name of DeepSpeed's expert groups (`ep_size_{ep}`, its convention)."""
    from scifm.parallel.expert_parallel import ExpertParallelExperts, apply_expert_parallel

    apply_expert_parallel(model, ctx.submesh("ep"), plain=True)
    group_name = f"ep_size_{ctx.dims.ep}"
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, ExpertParallelExperts):
            for name, p in module.named_parameters():
                p.allreduce, p.group_name = False, group_name  # what DeepSpeed's is_moe_param reads
                names.append(f"{module_name}.{name}")
    ep_group, edp_group = ctx.submesh("ep").get_group(), ctx.submesh("dp_shard_out").get_group()
    model.add_module("zero_expert_groups", _expert_groups_marker(group_name, ctx.dims.ep, ep_group, edp_group))
    return ExpertShards(frozenset(names), ep_group), group_name


def _expert_groups_marker(group_name: str, ep: int, ep_group, edp_group) -> nn.Module:
    """A module of DeepSpeed's MoE class holding nothing: DeepSpeed's engine gives ZeRO its expert
    groups only when the model holds one (an isinstance check), and calls its
    set_deepspeed_parallelism while it sets up, where DeepSpeed's groups are made as its own MoE
    layers make them and checked against scifm's mesh (tokens go over one, gradients the other)."""
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import groups

    class ZeroExpertGroups(MoE):
        def __init__(self):
            nn.Module.__init__(self)  # none of MoE's gate and experts
            self.num_experts, self.ep_size, self.expert_group_name = ep, ep, group_name

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            if group_name not in groups._get_expert_parallel_group_dict():
                groups._create_expert_and_data_parallel(ep, use_data_before_expert_parallel_=
                                                        use_data_before_expert_parallel_)
            theirs = (list(groups._get_expert_parallel_group_ranks(group_name)),
                      list(groups._get_expert_data_parallel_group_ranks(group_name)))
            ours = (dist.get_process_group_ranks(ep_group), dist.get_process_group_ranks(edp_group))
            if theirs != ours:
                raise RuntimeError(f"DeepSpeed's expert (data-parallel) groups {theirs} differ from scifm's {ours}")

        def forward(self, *args, **kwargs):
            raise RuntimeError("ZeroExpertGroups only names DeepSpeed's expert groups; it does not run")

    return ZeroExpertGroups()


def initialize_deepspeed(model: torch.nn.Module, ctx, parallel_cfg, build_optimizer, build_scheduler, *,
                         micro_batch: int, grad_accum: int, grad_clip: float, loss_fn: LossFn,
                         autocast) -> "DeepSpeedRunner":
    """`model` whole on every rank; `build_optimizer(model)` the AdamW and `build_scheduler(optimizer)`
    its schedule, built here after expert parallelism and handed to DeepSpeed, which partitions them
    (the runner's `optimizer` and `scheduler`); `parallel_cfg` the parallel section."""
    import deepspeed

    if ctx.distributed and ctx.dims.dp_size > 1:
        from scifm.parallel.router_stats import apply_global_router_stats

        apply_global_router_stats(model, ctx.dp_group)  # the aux losses of the global batch, as natively
    experts, expert_group = ExpertShards(), ""
    if ctx.dims.ep > 1:
        experts, expert_group = apply_deepspeed_expert_parallel(model, ctx)
    apply_recompute_and_compile(model, parallel_cfg)
    cfg = parallel_cfg.deepspeed
    config = deepspeed_config(cfg.zero_stage, cfg.offload_optimizer, cfg.offload_params, cfg.config,
                              micro_batch, grad_accum, grad_clip, experts=ctx.dims.ep > 1)
    optimizer = build_optimizer(model)
    names = {id(p): n for n, p in named_parameters(model).items()}
    group_names = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]  # the checkpoint's groups
    optimizer, origin = deepspeed_optimizer(optimizer, cfg, expert_group)
    scheduler = build_scheduler(optimizer)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return DeepSpeedRunner(engine, scheduler, loss_fn, autocast, ctx.device, group_names, origin, experts)


class DeepSpeedRunner(ModelRunner):
    """ModelRunner over a DeepSpeed engine: each micro-batch's backward (the engine's) accumulates;
    `clip_grad_norm` applies the whole update (the engine reduces, clips, steps the optimizer and the schedule) and
    returns the gradient norm it measured. Checkpoints are the native layout-free ones: full tensors
    gathered from DeepSpeed's partitions on save, scattered back into them on load, with the native
    optimizer's param groups (DeepSpeed's expert groups folded back into the groups they came from)."""

    applies_update = True
    gathers_checkpoint = True

    def __init__(self, engine, scheduler, loss_fn: LossFn, autocast, device: torch.device,
                 group_names: list[list[str]], group_origin: list[int], experts: ExpertShards):
        super().__init__(engine.module, loss_fn, autocast, device)
        self.engine = engine
        self.train_forward = engine  # its forward runs DeepSpeed's hooks (ZeRO-3 gathers, timers)
        self.optimizer = engine.optimizer.optimizer  # the AdamW over DeepSpeed's fp32 partitions
        self.scheduler = scheduler  # over that AdamW's param groups; the engine steps it
        self.group_names = group_names  # the native optimizer's param groups, by parameter name
        self.group_origin = group_origin  # for each of DeepSpeed's param groups, its native group
        self.experts = experts
        self.zero3 = engine.zero_optimization_stage() == 3

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # scifm's loss is already scaled for the global batch

    def clip_grad_norm(self, max_norm: float) -> float:
        self.engine.step()  # gradient_clipping in the config is max_norm
        return float(self.engine.get_global_grad_norm())

    def scheduler_state(self, scheduler) -> dict:
        return native_schedule_state(scheduler.state_dict(), self.group_origin)

    def load_scheduler_state(self, scheduler, state: dict) -> None:
        scheduler.load_state_dict(deepspeed_schedule_state(state, self.group_origin))

    # --- checkpoints in the native format ---------------------------------------------------

    def _link_optimizer_state(self) -> None:
        """ZeRO 1/2 (DeepSpeed 0.19.8) link each parameter to its slice of the AdamW moments once,
        after the first param group's step, before the later groups' state exists; their parameters
        then have no moments to read or write. Linking again after the state exists fixes that."""
        optimizer = self.engine.optimizer
        if not self.zero3:
            optimizer._hp_optimizer_states_linked = False
            optimizer._lazy_init_hp_params_optimizer_state()

    def _master_partitions(self) -> list[torch.Tensor]:
        """This rank's flat fp32 master tensors: the keys of the AdamW state."""
        optimizer = self.engine.optimizer
        return optimizer.fp32_partitioned_groups_flat if self.zero3 else optimizer.single_partition_of_fp32_groups

    def _adam_step(self) -> float:
        return max(float(self.optimizer.state[p]["step"]) for p in self._master_partitions())

    def checkpoint_states(self) -> tuple[dict, dict, list]:
        """Collective: full fp32 weights and AdamW moments under the native names, gathered one
        parameter at a time (experts whole over the ep group); each rank keeps every world_size-th
        tensor, so no rank holds the whole model and the ranks' tensors together are the checkpoint."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        self._link_optimizer_state()
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        step = torch.tensor(self._adam_step())
        module = self.engine.module
        params = named_parameters(module)
        model_state: dict[str, torch.Tensor] = {}
        optim: dict[str, torch.Tensor] = {}
        for i, (name, tensor) in enumerate(state_tensors(module).items()):
            keep = i % world == rank
            if name not in params:  # a buffer: the same on every rank
                if keep:
                    model_state[name] = tensor.detach().cpu().clone()
                continue
            p = params[name]
            full = {"": safe_get_full_fp32_param(p)}
            for key in ("exp_avg", "exp_avg_sq"):
                full[key] = safe_get_full_optimizer_state(p, key)
            full = {key: self.experts.whole(name, t) for key, t in full.items()}
            if keep:
                model_state[name] = full[""].detach().cpu().clone()
                for key in ("exp_avg", "exp_avg_sq"):
                    optim[f"{name}::{key}"] = full[key].detach().cpu().clone()
                optim[f"{name}::step"] = step.clone()
        # each native group's hyper-parameters are those of the first of DeepSpeed's groups made from it
        firsts = [self.optimizer.param_groups[self.group_origin.index(i)] for i in range(len(self.group_names))]
        param_groups = [{k: v for k, v in g.items() if k not in ("params", "moe", "name")} | {"params": names}
                        for g, names in zip(firsts, self.group_names)]
        return model_state, optim, param_groups

    def load_checkpoint_states(self, read: Callable[[str, list[str]], dict[str, torch.Tensor]],
                               hyperparameters: list[dict]) -> None:
        """Collective: `read(sub, names)` gives the saved full tensors (sub: "model" or "optimizer");
        each rank writes its own slices into DeepSpeed's fp32 weights, model weights and moments,
        a few parameters at a time; `hyperparameters` replace the param groups' own."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        for p in self._master_partitions():  # AdamW makes its moments at its first step
            state = self.optimizer.state[p]
            if "exp_avg" not in state:  # torch counts steps in a tensor, DeepSpeed's CPU Adam in an int
                step = torch.tensor(0.0) if isinstance(self.optimizer, torch.optim.AdamW) else 0
                state.update(step=step, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        self._link_optimizer_state()
        module = self.engine.module
        params = named_parameters(module)
        state = state_tensors(module)
        buffers = [n for n in state if n not in params]
        for name, value in read("model", buffers).items():
            state[name].copy_(value)
        names = list(params)
        step = 0.0
        for start in range(0, len(names), LOAD_CHUNK):
            chunk = names[start:start + LOAD_CHUNK]
            weights = read("model", chunk)
            moments = read("optimizer", [f"{n}::{k}" for n in chunk for k in ("exp_avg", "exp_avg_sq", "step")])
            for name in chunk:
                p = params[name]
                weight = self.experts.part(name, weights[name])
                safe_set_full_fp32_param(p, weight)
                self._set_model_weight(p, weight)
                for key in ("exp_avg", "exp_avg_sq"):
                    safe_set_full_optimizer_state(p, self.experts.part(name, moments[f"{name}::{key}"]), key)
                step = max(step, float(moments[f"{name}::step"]))
        for p in self._master_partitions():
            state = self.optimizer.state[p]
            state["step"] = torch.tensor(step) if torch.is_tensor(state["step"]) else int(step)
        for group, native in zip(self.optimizer.param_groups, self.group_origin):
            group.update(hyperparameters[native])

    def _set_model_weight(self, p: torch.nn.Parameter, value: torch.Tensor) -> None:
        """The weights the forward pass reads (DeepSpeed's copy next to its fp32 master)."""
        if self.zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if torch.distributed.get_rank() == 0:
                    p.data.copy_(value)
        else:
            p.data.copy_(value)  # ZeRO 1/2: every rank holds the whole parameter (its block of the experts)
