"""parallel.engine=deepspeed (WORK IN PROGRESS, not wired into the trainer yet): DeepSpeed ZeRO over the
same ScientificMoE, the same optimizer, schedule and loss scaling as the native engine.

Measured (wip/deepspeed_proto.py, 2 gloo processes, tiny model, 3 steps): ZeRO 1, 2 and 3 give the
one-process native losses to 1e-7 relative and gradient norms to 1e-5, with
  - `managed_gradient_accumulation: false`: backward only accumulates, `engine.step()` is the
    step's boundary (reduce, clip with `gradient_clipping`, optimizer, scheduler);
  - `engine.backward(loss, scale_wrt_gas=False)`: scifm's loss is already scaled by dp/targets,
    and DeepSpeed averages gradients over the data-parallel ranks as FSDP does;
  - the router statistics all-reduced over the data-parallel group (apply_global_router_stats),
    as under the native engine.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from scifm.core.errors import ConfigError
from scifm.parallel.runner import LossFn, ModelRunner, MicroBatch


def deepspeed_config(zero_stage: int, offload_optimizer: bool, offload_params: bool, user_path: str,
                     micro_batch: int, grad_accum: int, grad_clip: float, bf16: bool) -> dict:
    """What scifm derives from its own keys, merged with the user's JSON; a key both set differently
    is a one-line error naming it (DeepSpeed's own defaults, e.g. gradient_clipping=1.0, never apply)."""
    zero: dict = {"stage": zero_stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if offload_params:
        zero["offload_param"] = {"device": "cpu"}
    derived = {
        "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip, "zero_optimization": zero, "bf16": {"enabled": bf16},
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


def initialize_deepspeed(model: torch.nn.Module, optimizer, scheduler, ctx, cfg, *, micro_batch: int,
                         grad_accum: int, grad_clip: float, bf16: bool, loss_fn: LossFn, autocast) -> "DeepSpeedRunner":
    """`model` whole on every rank; `optimizer`/`scheduler` built over its parameters (DeepSpeed
    partitions them); `cfg` the parallel.deepspeed section."""
    try:
        import deepspeed
    except ImportError:
        raise ConfigError("parallel.engine: deepspeed is not installed; pip install -e '.[deepspeed]'") from None
    if ctx.distributed and ctx.dims.dp_size > 1:
        from scifm.parallel.router_stats import apply_global_router_stats

        apply_global_router_stats(model, ctx.dp_group)  # the aux losses of the global batch, as natively
    config = deepspeed_config(cfg.zero_stage, cfg.offload_optimizer, cfg.offload_params, cfg.config,
                              micro_batch, grad_accum, grad_clip, bf16)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]  # before DeepSpeed flattens them
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return DeepSpeedRunner(engine, loss_fn, autocast, ctx.device, groups)


class DeepSpeedRunner(ModelRunner):
    """ModelRunner over a DeepSpeed engine: each micro-batch's backward accumulates; `clip_grad_norm`
    applies the whole update (the engine reduces, clips, steps the optimizer and the schedule) and
    returns the gradient norm it measured."""

    applies_update = True

    def __init__(self, engine, loss_fn: LossFn, autocast, device: torch.device, group_names: list[list[str]]):
        super().__init__(engine.module, loss_fn, autocast, device)
        self.engine = engine
        self.group_names = group_names  # the optimizer's param groups, by parameter name

    def checkpoint_states(self) -> tuple[dict, dict, list]:
        """Collective: full fp32 weights and AdamW moments gathered from DeepSpeed's partitions (ZeRO
        1-3) under the native names, so the checkpoint is a native one (eval, export, any layout)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        module = self.engine.module
        model_state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}  # buffers
        optim: dict[str, torch.Tensor] = {}
        for name, p in module.named_parameters():
            model_state[name] = safe_get_full_fp32_param(p).detach().cpu().clone()
            for key in ("exp_avg", "exp_avg_sq"):
                value = safe_get_full_optimizer_state(p, key)
                if value is not None:
                    optim[f"{name}::{key}"] = value.detach().cpu().clone()
            if f"{name}::exp_avg" in optim:
                optim[f"{name}::step"] = torch.tensor(float(self.engine.global_steps))
        base_groups = self.engine.optimizer.optimizer.param_groups
        param_groups = [{k: v for k, v in g.items() if k != "params"} | {"params": names}
                        for g, names in zip(base_groups, self.group_names)]
        return model_state, optim, param_groups

    def forward_backward(self, micro: list[MicroBatch], scale: float) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in micro:
            batch = batch.to(self.device)
            with self.autocast:
                logits_BSV = self.engine(batch.input_ids, **batch.model_kwargs())
            loss = self.loss_fn(logits_BSV, batch.labels, scale)
            self.engine.backward(loss, scale_wrt_gas=False)
            total += loss.detach().double()
        return total.cpu()

    def clip_grad_norm(self, max_norm: float) -> float:
        self.engine.step()  # gradient_clipping in the config is max_norm
        return float(self.engine.get_global_grad_norm())
