"""PlanConfig (plan.* keys): the hardware `scifm plan` assumes, with defaults for an H100/H200-class
GPU (SXM, NVLink within a node, one 400 Gb/s NIC per GPU between nodes), and the planner's options."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from scifm.core.checks import require
from scifm.core.errors import ConfigError


@dataclass
class PlanConfig:
    gpu_memory_gb: float = 80.0  # per GPU, GiB (H100 80, H200 141)
    reserved_gb: float = 4.0  # per GPU, GiB kept off limits: CUDA context, NCCL, cuBLAS workspaces, fragmentation
    # dense peak per GPU in TFLOP/s by compute dtype (H100 SXM; fp32 without TF32, as torch's default matmul)
    peak_tflops_bf16: float = 989.0
    peak_tflops_fp8: float = 1979.0
    peak_tflops_fp32: float = 67.0
    mfu: float = 0.4  # share of the peak the model's matmuls reach
    intra_node_gbps: float = 450.0  # GB/s per GPU and direction inside a node (NVLink 4: 900 GB/s both ways)
    inter_node_gbps: float = 50.0  # GB/s per GPU and direction between nodes (400 Gb/s InfiniBand)
    # microseconds each step of a collective adds to its bytes' time (a ring all-gather over n ranks takes
    # n-1 steps, an all-to-all one): the per-hop latencies NCCL's own tuning model assumes for its ring
    # algorithm with its bulk (Simple) protocol, over NVLink and over the network
    intra_node_latency_us: float = 3.4
    inter_node_latency_us: float = 14.0
    # FSDP's all-gathers and reduce-scatters run beside the compute (NCCL on its own streams); false where
    # they take the compute's own cores (gloo on a CPU), so all of their time adds to the step
    comm_overlap: bool = True
    # a saved tokenizer directory: exact vocabulary sizes, and the run's data is sampled for the encoders'
    # activations and FLOPs; "" = typical vocabulary sizes, encoders left out
    tokenizer: str = ""
    sample_steps: int = 4  # optimizer steps of the run's data sampled for the encoders (with a tokenizer)
    # a run's metrics.jsonl (or the run's directory): its logged routing (tokens per expert) gives, for each
    # ep size, how many more rows than an even share the busiest ep rank takes (routing_load.py); "" = every
    # expert its even share
    routing_metrics: str = ""
    top: int = 15  # rows shown in the table (--json lists all)

    def validate(self) -> None:
        for key in ("gpu_memory_gb", "peak_tflops_bf16", "peak_tflops_fp8", "peak_tflops_fp32",
                    "intra_node_gbps", "inter_node_gbps"):
            require(getattr(self, key) > 0, f"plan.{key}", f"must be > 0, got {getattr(self, key)}")
        for key in ("intra_node_latency_us", "inter_node_latency_us"):
            require(getattr(self, key) >= 0, f"plan.{key}", f"must be >= 0, got {getattr(self, key)}")
        require(0 <= self.reserved_gb < self.gpu_memory_gb, "plan.reserved_gb",
                f"must be in [0, plan.gpu_memory_gb={self.gpu_memory_gb}), got {self.reserved_gb}")
        require(0 < self.mfu <= 1, "plan.mfu", f"must be in (0, 1], got {self.mfu}")
        require(self.sample_steps >= 1, "plan.sample_steps", f"must be >= 1, got {self.sample_steps}")
        require(self.top >= 1, "plan.top", f"must be >= 1, got {self.top}")

    def peak_flops(self, dtype: str) -> float:
        return {"bf16": self.peak_tflops_bf16, "fp8": self.peak_tflops_fp8, "fp32": self.peak_tflops_fp32}[dtype] * 1e12


def compose_plan_config(overrides: list[str]) -> PlanConfig:
    """PlanConfig from `plan.KEY=VALUE` overrides, type-checked like Hydra's keys."""
    schema = OmegaConf.structured(PlanConfig)
    for item in overrides:
        key, sep, _ = item.partition("=")
        require(bool(sep), key, "give plan.KEY=VALUE")
    try:
        merged = OmegaConf.merge(schema, OmegaConf.from_dotlist([o.removeprefix("plan.") for o in overrides]))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "") or "plan"
        raise ConfigError(f"plan.{key}: {str(err).splitlines()[0]}" if key != "plan" else f"plan: {err}") from None
    cfg.validate()
    return cfg
