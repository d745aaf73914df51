"""parallel.engine=deepspeed: DeepSpeed ZeRO (stages 0-3, CPU offload) over the same ScientificMoE,
with scifm's optimizer, schedule, loss scaling and router statistics, so a run equals the native
one-process run; checkpoints stay scifm's layout-free ones (gathered from and scattered into
DeepSpeed's partitions), so they move between engines and layouts.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Callable

import torch

from scifm.core.errors import ConfigError
from scifm.parallel.parallelize import apply_recompute_and_compile
from scifm.parallel.runner import LossFn, ModelRunner

_WRAPPER_PREFIX = re.compile(r"(_checkpoint_wrapped_module|_orig_mod)\.")
LOAD_CHUNK = 16  # parameters read and scattered at a time when loading (bounds the host memory)


def deepspeed_config(zero_stage: int, offload_optimizer: bool, offload_params: bool, user_path: str,
                     micro_batch: int, grad_accum: int, grad_clip: float) -> dict:
    """What scifm derives from its own keys, merged with the user's JSON; a key both set differently
    is a one-line error naming it (DeepSpeed's own defaults, e.g. gradient_clipping=1.0, never apply)."""
    zero: dict = {"stage": zero_stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if offload_params:
        zero["offload_param"] = {"device": "cpu"}
    derived = {
        "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip, "zero_optimization": zero, 
        "managed_gradient_accumulation": False, "steps_per_print": 2**31 - 1,
    }
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


def deepspeed_optimizer(optimizer: torch.optim.AdamW, cfg) -> torch.optim.Optimizer:
    """With the optimizer offloaded, DeepSpeed's CPU AdamW (its vectorised host kernel, the same
    update up to float32 rounding) over the same parameter groups; else `optimizer` itself."""
    if not cfg.offload_optimizer:
        return optimizer
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
    defaults = optimizer.defaults
    return DeepSpeedCPUAdam(groups, lr=defaults["lr"], betas=defaults["betas"], eps=defaults["eps"], adamw_mode=True)


def initialize_deepspeed(model: torch.nn.Module, optimizer, scheduler, ctx, parallel_cfg, *, micro_batch: int,
                         grad_accum: int, grad_clip: float, loss_fn: LossFn, autocast) -> "DeepSpeedRunner":
    """`model` whole on every rank; `optimizer` (from deepspeed_optimizer) and `scheduler` built over
    its parameters (DeepSpeed partitions them); `parallel_cfg` the parallel section."""
    import deepspeed

    if ctx.distributed and ctx.dims.dp_size > 1:
        from scifm.parallel.router_stats import apply_global_router_stats

        apply_global_router_stats(model, ctx.dp_group)  # the aux losses of the global batch, as natively
    apply_recompute_and_compile(model, parallel_cfg)
    cfg = parallel_cfg.deepspeed
    config = deepspeed_config(cfg.zero_stage, cfg.offload_optimizer, cfg.offload_params, cfg.config,
                              micro_batch, grad_accum, grad_clip)
    names = {id(p): n for n, p in named_parameters(model).items()}
    groups = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]  # before DeepSpeed flattens them
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return DeepSpeedRunner(engine, loss_fn, autocast, ctx.device, groups)


class DeepSpeedRunner(ModelRunner):
    """ModelRunner over a DeepSpeed engine: each micro-batch's backward (the engine's) accumulates;
    `clip_grad_norm` applies the whole update (the engine reduces, clips, steps the optimizer and the schedule) and
    returns the gradient norm it measured. Checkpoints are the native layout-free ones: full tensors
    gathered from DeepSpeed's partitions on save, scattered back into them on load."""

    applies_update = True
    gathers_checkpoint = True

    def __init__(self, engine, loss_fn: LossFn, autocast, device: torch.device, group_names: list[list[str]]):
        super().__init__(engine.module, loss_fn, autocast, device)
        self.engine = engine
        self.train_forward = engine  # its forward runs DeepSpeed's hooks (ZeRO-3 gathers, timers)
        self.group_names = group_names  # the optimizer's param groups, by parameter name
        self.base_optimizer = engine.optimizer.optimizer  # the AdamW over DeepSpeed's fp32 partitions
        self.zero3 = engine.zero_optimization_stage() == 3

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # scifm's loss is already scaled for the global batch

    def clip_grad_norm(self, max_norm: float) -> float:
        self.engine.step()  # gradient_clipping in the config is max_norm
        return float(self.engine.get_global_grad_norm())

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
        return max(float(self.base_optimizer.state[p]["step"]) for p in self._master_partitions())

    def checkpoint_states(self) -> tuple[dict, dict, list]:
        """Collective: full fp32 weights and AdamW moments under the native names, gathered one
        parameter at a time; each rank keeps every world_size-th tensor, so no rank holds the whole
        model and the ranks' tensors together are the checkpoint."""
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
            if keep:
                model_state[name] = full[""].detach().cpu().clone()
                for key in ("exp_avg", "exp_avg_sq"):
                    optim[f"{name}::{key}"] = full[key].detach().cpu().clone()
                optim[f"{name}::step"] = step.clone()
        param_groups = [{k: v for k, v in g.items() if k != "params"} | {"params": names}
                        for g, names in zip(self.base_optimizer.param_groups, self.group_names)]
        return model_state, optim, param_groups

    def load_checkpoint_states(self, read: Callable[[str, list[str]], dict[str, torch.Tensor]],
                               hyperparameters: list[dict]) -> None:
        """Collective: `read(sub, names)` gives the saved full tensors (sub: "model" or "optimizer");
        each rank writes its own slices into DeepSpeed's fp32 weights, model weights and moments,
        a few parameters at a time; `hyperparameters` replace the param groups' own."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        for p in self._master_partitions():  # AdamW makes its moments at its first step
            state = self.base_optimizer.state[p]
            if "exp_avg" not in state:  # torch counts steps in a tensor, DeepSpeed's CPU Adam in an int
                step = torch.tensor(0.0) if isinstance(self.base_optimizer, torch.optim.AdamW) else 0
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
                safe_set_full_fp32_param(p, weights[name])
                self._set_model_weight(p, weights[name])
                for key in ("exp_avg", "exp_avg_sq"):
                    safe_set_full_optimizer_state(p, moments[f"{name}::{key}"], key)
                step = max(step, float(moments[f"{name}::step"]))
        for p in self._master_partitions():
            state = self.base_optimizer.state[p]
            state["step"] = torch.tensor(step) if torch.is_tensor(state["step"]) else int(step)
        for group, saved in zip(self.base_optimizer.param_groups, hyperparameters):
            group.update(saved)

    def _set_model_weight(self, p: torch.nn.Parameter, value: torch.Tensor) -> None:
        """The weights the forward pass reads (DeepSpeed's copy next to its fp32 master)."""
        if self.zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if torch.distributed.get_rank() == 0:
                    p.data.copy_(value)
        else:
            p.data.copy_(value)  # ZeRO 1/2: every rank holds the whole parameter
