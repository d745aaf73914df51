"""FP8 training (trainer.precision=fp8), applied to a built model from outside, before any sharding.

The candidates are the model's nn.Linear layers and its routed experts; trainer.fp8.include /
exclude choose among them. A chosen layer whose matmul dimensions are not multiples of 16 (what
FP8 GEMM kernels take) stays in high precision and is listed, once, in the run's log.

- torchao: each chosen Linear becomes torchao's Float8Linear with the recipe's scaling
  (tensorwise, rowwise, rowwise_with_gw_hp); it keeps its `weight` parameter, so checkpoints hold
  the same high-precision master weights under the same names and need no FP8 to load.
- te: each chosen Linear becomes Transformer Engine's Linear (same weight), and forward passes run
  under te's FP8 autocast with the recipe (delayed, current, blockwise, mxfp8).
- Routed experts, under either backend, through GroupedExperts.expert_gemm (so expert parallelism
  runs them unchanged): on Hopper and Blackwell GPUs as grouped FP8 GEMMs with rowwise scales
  (fp8_grouped.py); elsewhere (CPU, Ada) as a loop of per-expert torch._scaled_mm calls with
  tensorwise dynamic scales (e4m3 forward, e5m2 gradients), one scale per expert and tensor.

Shape suffixes: N rows, D in features, F out features.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import importlib
import logging
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from scifm.core.checks import require
from scifm.model.moe import GroupedExperts, looped_gemm
from scifm.parallel.fp8_config import DEFAULT_RECIPE, TE_RECIPES, TORCHAO_RECIPES, Fp8Config
from scifm.parallel.fp8_grouped import E4M3, cast_scaled, fp8_grouped_gemm, grouped_fp8_supported, scale_for

E5M2 = torch.float8_e5m2
ALIGN = 16  # FP8 GEMMs (cuBLASLt, and the grouped kernels) take the reduced and the output dimension in multiples of 16
MIN_CAPABILITY = {"te": {"delayed": (8, 9), "current": (8, 9), "blockwise": (9, 0), "mxfp8": (10, 0)},
                  "torchao": {recipe: (8, 9) for recipe in TORCHAO_RECIPES}}


@contextlib.contextmanager
def _quiet_torchao():
    """torchao warns on import for each CUDA kernel library that cannot load (all of them on a CPU),
    and torch about a deprecated registration torchao makes: nothing a user can act on."""
    logs = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)


def _importable(module: str) -> bool:
    try:
        with _quiet_torchao():
            importlib.import_module(module)
    except ImportError:
        return False
    return True


def resolve_fp8(cfg: Fp8Config, device: torch.device) -> tuple[str, str]:
    """-> (backend, recipe) this machine runs, or a one-line ConfigError saying what would work."""
    backend = cfg.backend
    if backend == "auto":
        te_fits = device.type == "cuda" and (not cfg.recipe or cfg.recipe in TE_RECIPES)
        backend = "te" if te_fits and _importable("transformer_engine.pytorch") else "torchao"
    recipe = cfg.recipe or DEFAULT_RECIPE[backend]
    if backend == "te":
        require(device.type == "cuda", "trainer.fp8.backend",
                f"te (Transformer Engine) runs on CUDA GPUs, and this run is on {device.type}; "
                "use trainer.fp8.backend=torchao")
        require(_importable("transformer_engine.pytorch"), "trainer.fp8.backend",
                "te: Transformer Engine is not installed (pip install -e '.[gpu]' on a CUDA machine); "
                "use trainer.fp8.backend=torchao")
    else:
        require(_importable("torchao.float8"), "trainer.fp8.backend",
                "torchao is not installed (pip install -e '.[fp8]')")
        require(recipe in TORCHAO_RECIPES, "trainer.fp8.recipe",
                f"{recipe} needs trainer.fp8.backend=te on a CUDA GPU with Transformer Engine; here the "
                f"backend is torchao, whose recipes are {', '.join(TORCHAO_RECIPES)}")
    if device.type == "cuda":
        have, need = torch.cuda.get_device_capability(device), MIN_CAPABILITY[backend][recipe]
        require(have >= need, "trainer.fp8.recipe",
                f"{backend} {recipe} needs a GPU of compute capability {need[0]}.{need[1]} or newer, this one is "
                f"{have[0]}.{have[1]}" + ("; use trainer.fp8.recipe=blockwise or current" if recipe == "mxfp8" else ""))
    return backend, recipe


@dataclass
class Fp8Conversion:
    backend: str
    recipe: str
    linears: list[str] = field(default_factory=list)  # now FP8 Linear modules
    experts: list[str] = field(default_factory=list)  # GroupedExperts with FP8 expert GEMMs
    experts_grouped: bool = False  # the experts' kernels: grouped FP8 GEMMs, or per-expert scaled matmuls
    misfits: list[str] = field(default_factory=list)  # chosen, but dimensions FP8 kernels cannot take
    te_recipe: object = None  # the te recipe object forward passes run under
    fsdp_float8_all_gather: bool = False  # FSDP2 gathers the FP8 Linear weights in float8 (torchao tensorwise)

    def forward_context(self, autocast):
        """The precision context of forward passes: `autocast`, plus te's FP8 autocast under te."""
        if self.backend != "te":
            return autocast
        import transformer_engine.pytorch as te

        if hasattr(te, "autocast"):  # te 2.17 renamed fp8_autocast (the old name warns)
            return _Stacked(autocast, lambda: te.autocast(enabled=True, recipe=self.te_recipe))
        return _Stacked(autocast, lambda: te.fp8_autocast(enabled=True, fp8_recipe=self.te_recipe))

    def after_update(self, model: nn.Module) -> None:
        """Collective, after each optimizer step. Under the float8 all-gather: the scales of all FP8
        weights for the next gathers in one all-reduce (torchao's precompute), where each weight
        would otherwise all-reduce its own amax at each of its gathers, forward and backward."""
        if self.fsdp_float8_all_gather:
            with _quiet_torchao():
                from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp
            precompute_float8_dynamic_scale_for_fsdp(model)

    def experts_kernels(self) -> str:
        return ("grouped GEMMs, rowwise scales, bf16 weight gradient" if self.experts_grouped
                else "per-expert scaled matmuls")

    def describe(self) -> str:
        line = (f"fp8: {self.backend} {self.recipe}; {len(self.linears)} linear layers and "
                f"{len(self.experts)} routed-expert blocks ({self.experts_kernels()}) in FP8")
        if self.fsdp_float8_all_gather:
            line += "; FSDP all-gathers their weights in float8"
        if self.misfits:
            line += (f"; kept in high precision, dimensions not multiples of {ALIGN}: "
                     f"{', '.join(self.misfits)}")
        return line


class _Stacked:
    """A reusable context: enters `outer`, then a fresh context from `make_inner` (te's are one-shot)."""

    def __init__(self, outer, make_inner):
        self.outer, self.make_inner, self.stack = outer, make_inner, None

    def __enter__(self):
        self.stack = contextlib.ExitStack()
        self.stack.enter_context(self.outer)
        self.stack.enter_context(self.make_inner())

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)


def _chosen(name: str, cfg: Fp8Config) -> bool:
    return (any(fnmatch.fnmatchcase(name, p) for p in cfg.include)
            and not any(fnmatch.fnmatchcase(name, p) for p in cfg.exclude))


def apply_fp8(model: nn.Module, cfg: Fp8Config, device: torch.device, fsdp: bool = False) -> Fp8Conversion:
    """Converts the chosen layers of `model` (whole, unsharded) in place. `fsdp`: FSDP2 will shard
    the weights (without tensor parallelism): under torchao's tensorwise recipe the FP8 Linear
    weights are then cast to float8 before FSDP gathers them (half the bytes of bf16), with one
    scale over the whole weight, as the Linear would compute it from the gathered weight."""
    backend, recipe = resolve_fp8(cfg, device)
    conversion = Fp8Conversion(backend, recipe, experts_grouped=grouped_fp8_supported(device),
                               fsdp_float8_all_gather=fsdp and backend == "torchao" and recipe == "tensorwise")
    expert_gemm = fp8_grouped_gemm if conversion.experts_grouped else fp8_looped_gemm
    linears = []
    for name, module in model.named_modules():
        if not name or not _chosen(name, cfg):
            continue
        if isinstance(module, GroupedExperts):
            _, d, f = module.w1.shape
            if d % ALIGN or f % ALIGN:
                conversion.misfits.append(name)
                continue
            module.expert_gemm = expert_gemm
            conversion.experts.append(name)
        elif type(module) is nn.Linear:
            if module.in_features % ALIGN or module.out_features % ALIGN:
                conversion.misfits.append(name)
            else:
                linears.append(name)
    if backend == "torchao":
        _to_torchao(model, set(linears), recipe, conversion.fsdp_float8_all_gather)
    else:
        conversion.te_recipe = _to_te(model, linears, recipe)
    conversion.linears = linears
    return conversion


def _to_torchao(model: nn.Module, names: set[str], recipe: str, float8_all_gather: bool) -> None:
    with _quiet_torchao():
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
        from torchao.float8.float8_linear import Float8Linear

    class RowPaddedFloat8Linear(Float8Linear):
        """The weight gradient's FP8 GEMM sums over the input's rows, which the GPU kernels take in
        multiples of ALIGN only (an encoder's rows are any count, none when a batch lacks its
        modality, and Float8Linear's amax of an empty tensor raises): zero rows are added, which
        change no other row's scale and add nothing to any product, and their outputs dropped."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            rows = x.numel() // x.shape[-1]
            pad = -rows % ALIGN if rows else ALIGN
            if not pad:
                return super().forward(x)
            x_ND = F.pad(x.reshape(rows, x.shape[-1]), (0, 0, 0, pad))
            return super().forward(x_ND)[:rows].reshape(*x.shape[:-1], self.out_features)

    config = Float8LinearConfig.from_recipe_name(recipe)
    # the weights become a tensor subclass that FSDP2 asks for its float8 all-gather input;
    # checkpoints see through it (sharded_state.plain)
    config = replace(config, enable_fsdp_float8_all_gather=float8_all_gather)
    convert_to_float8_training(model, config=config, module_filter_fn=lambda module, fqn: fqn in names)
    for name in names:
        model.get_submodule(name).__class__ = RowPaddedFloat8Linear


def _to_te(model: nn.Module, names: list[str], recipe: str):
    """Untested here: Transformer Engine installs only against a CUDA build of torch."""
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe as te_recipes

    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        new = te.Linear(old.in_features, old.out_features, bias=old.bias is not None,
                        params_dtype=old.weight.dtype, device=old.weight.device)
        with torch.no_grad():  # the same weights: FP8 is a compute precision, not a new model
            new.weight.copy_(old.weight)
            if old.bias is not None:
                new.bias.copy_(old.bias)
        setattr(parent, child, new)
    make = {"delayed": te_recipes.DelayedScaling, "current": te_recipes.Float8CurrentScaling,
            "blockwise": te_recipes.Float8BlockScaling, "mxfp8": te_recipes.MXFP8BlockScaling}
    return make[recipe]()


# --- per-expert FP8 matmuls ---------------------------------------------------------------------


def _to_fp8(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensorwise dynamic scaling: -> (t scaled into dtype's range, the inverse scale in fp32)."""
    amax = t.abs().amax() if t.numel() else torch.zeros((), device=t.device)
    scale = scale_for(amax, dtype)
    return cast_scaled(t, scale, dtype), scale.reciprocal()


def _scaled_mm(a8_MK: torch.Tensor, a_inv: torch.Tensor, b8_KN: torch.Tensor, b_inv: torch.Tensor,
               out_dtype: torch.dtype) -> torch.Tensor:
    # the kernels take the first operand row-major and the second column-major
    return torch._scaled_mm(a8_MK.contiguous(), b8_KN.t().contiguous().t(), scale_a=a_inv, scale_b=b_inv,
                            out_dtype=out_dtype)


def _pad_rows(t8_ND: torch.Tensor) -> torch.Tensor:
    """Zero rows up to a multiple of ALIGN (at least one block): they add nothing to a product over rows."""
    pad = -t8_ND.shape[0] % ALIGN or (ALIGN if t8_ND.shape[0] == 0 else 0)
    return torch.cat([t8_ND, t8_ND.new_zeros(pad, t8_ND.shape[1])])


class _Fp8Matmul(torch.autograd.Function):
    """x_ND @ w_DF in FP8: e4m3 operands forward; gradients in e5m2 (wider range) against e4m3.
    Each operand is cast once: backward reuses forward's e4m3 copies (kept instead of the high
    precision tensors, as FP8 training does) and casts the incoming gradient once for both products."""

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, w_DF: torch.Tensor) -> torch.Tensor:
        x8, x_inv = _to_fp8(x_ND, E4M3)
        w8, w_inv = _to_fp8(w_DF, E4M3)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.dtypes = x_ND.dtype, w_DF.dtype
        return _scaled_mm(x8, x_inv, w8, w_inv, x_ND.dtype)

    @staticmethod
    def backward(ctx, grad_NF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        g8, g_inv = _to_fp8(grad_NF, E5M2)
        grad_x_ND = _scaled_mm(g8, g_inv, w8.t(), w_inv, x_dtype)
        # the reduced dimension here is the rows, any count: padded to what the kernels take
        grad_w_DF = _scaled_mm(_pad_rows(x8).t(), x_inv, _pad_rows(g8), g_inv, w_dtype)
        return grad_x_ND, grad_w_DF


@torch.compiler.disable  # eager under parallel.compile: its scales branch on the (data-dependent) row count
def fp8_matmul(x_ND: torch.Tensor, w_DF: torch.Tensor) -> torch.Tensor:
    """One expert's matmul under FP8 where grouped FP8 GEMMs do not run. The result takes x's dtype (bf16 under autocast, where the
    weight is cast to it as autocast would); each gradient its operand's."""
    return _Fp8Matmul.apply(x_ND, w_DF.to(x_ND.dtype))


# eager under parallel.compile, as a whole: its split sizes are read from the counts (a graph break each)
fp8_looped_gemm = torch.compiler.disable(functools.partial(looped_gemm, mm=fp8_matmul))
