"""ParallelDims: a layout checked against the model before any process group exists, then a mesh.

world = pp * dp_replicate * dp_shard * tp. Expert parallelism borrows ranks from dp_shard x tp
(the usual MoE convention): the ep group spans all tp ranks and ep / tp of the dp_shard ranks,
so dp_shard splits into dp_shard_out x dp_shard_in_ep. Mesh dimensions, outermost first:

  pp, dp_replicate, dp_shard_out, dp_shard_in_ep, tp
  flattened: dp_shard = dp_shard_out x dp_shard_in_ep   (FSDP of non-expert weights)
             dp       = dp_replicate x dp_shard          (data loading, loss normalisation)
             ep       = dp_shard_in_ep x tp              (expert sharding, token all-to-all)
FSDP of expert weights runs over dp_shard_out (the dp_shard ranks the experts are not split on).
"""

from __future__ import annotations

from dataclasses import dataclass

from scifm.core.errors import ConfigError
from scifm.model.config import ModelConfig
from scifm.model.multimodal import VOCAB_MULTIPLE

MESH_DIMS = ("pp", "dp_replicate", "dp_shard_out", "dp_shard_in_ep", "tp")


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp(self) -> bool:
        """The native engine applies FSDP2 (HSDP) whenever there is more than one data-parallel rank."""
        return self.dp_size > 1

    @property
    def dp_shard_in_ep(self) -> int:
        return self.ep // self.tp if self.ep > 1 else 1

    @property
    def dp_shard_out(self) -> int:
        return self.dp_shard // self.dp_shard_in_ep

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        return (self.pp, self.dp_replicate, self.dp_shard_out, self.dp_shard_in_ep, self.tp)

    def validate(self, model: ModelConfig, world_size: int) -> None:
        """Every constraint the layout puts on the model and the world, each named with its numbers."""
        for key in ("dp_replicate", "dp_shard", "tp", "pp", "ep"):
            if getattr(self, key) < 1:
                raise ConfigError(f"parallel.{key}: must be >= 1, got {getattr(self, key)}")
        if self.ep > 1:  # before the world: ep adds no processes, so a world mismatch may be ep's
            self._validate_ep(model)
        if self.world_size != world_size:
            raise ConfigError(
                f"parallel: pp={self.pp} x dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard} "
                f"x tp={self.tp} = {self.world_size} processes, but the world has {world_size}{self.ep_note()}"
            )
        if model.n_heads % self.tp or model.n_kv_heads % self.tp:
            raise ConfigError(
                f"parallel.tp: n_heads={model.n_heads} and n_kv_heads={model.n_kv_heads} must both be "
                f"divisible by tp={self.tp}"
            )
        if model.ffn_hidden % self.tp:
            raise ConfigError(f"parallel.tp: model.ffn_hidden={model.ffn_hidden} is not divisible by tp={self.tp}")
        if model.moe.n_shared_experts and (model.moe.n_shared_experts * model.moe.expert_ffn) % self.tp:
            raise ConfigError(
                f"parallel.tp: shared-expert width {model.moe.n_shared_experts * model.moe.expert_ffn} "
                f"is not divisible by tp={self.tp}"
            )
        if VOCAB_MULTIPLE % self.tp:
            raise ConfigError(
                f"parallel.tp: the vocabulary is padded to a multiple of {VOCAB_MULTIPLE}, which "
                f"tp={self.tp} does not divide; use a power of two up to {VOCAB_MULTIPLE}"
            )
        if model.vocab_size % self.tp:  # an explicit vocabulary is not padded
            raise ConfigError(f"parallel.tp: model.vocab_size={model.vocab_size} is not divisible by tp={self.tp}")
        if self.pp > model.n_layers:
            raise ConfigError(f"parallel.pp: pp={self.pp} stages for only n_layers={model.n_layers} layers")
        if self.pp > 1 and model.tie_embeddings:
            raise ConfigError(
                f"model.tie_embeddings: not supported with parallel.pp={self.pp} (the embedding and the output "
                "layer sit on different pipeline stages); set model.tie_embeddings=false"
            )

    def ep_note(self) -> str:
        """For a message about the world size: ep is no factor of it."""
        if self.ep == 1:
            return ""
        return (f" (parallel.ep={self.ep} adds no processes: it borrows its ranks from dp_shard x tp = "
                f"{self.dp_shard * self.tp})")

    def _validate_ep(self, model: ModelConfig) -> None:
        borrowed = self.dp_shard * self.tp
        if self.ep % self.tp or self.dp_shard % (self.ep // self.tp):
            advice = ("raise parallel.dp_shard or parallel.tp" if self.ep > borrowed
                      else "change parallel.ep or parallel.tp")
            raise ConfigError(
                f"parallel.ep: ep={self.ep} borrows from dp_shard x tp, so it must be a multiple of "
                f"tp={self.tp} and ep / tp must divide dp_shard={self.dp_shard} (dp_shard x tp = {borrowed} "
                f"ranks); {advice}"
            )
        if model.moe.n_experts % self.ep:
            raise ConfigError(
                f"parallel.ep: n_experts={model.moe.n_experts} is not divisible by ep={self.ep} (ep borrows "
                f"its ranks from dp_shard x tp = {borrowed} and splits the experts over them)"
            )
        if model.n_layers == model.n_dense_layers:
            raise ConfigError(
                f"parallel.ep: ep={self.ep} (it borrows its ranks from dp_shard x tp = {borrowed}) splits MoE "
                f"layers, but all {model.n_layers} are dense; set parallel.ep=1 or lower model.n_dense_layers"
            )

    def build_mesh(self, device_type: str):
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device_type, self.mesh_shape, mesh_dim_names=MESH_DIMS)
        mesh["dp_shard_out", "dp_shard_in_ep"]._flatten("dp_shard")
        mesh["dp_replicate", "dp_shard_out", "dp_shard_in_ep"]._flatten("dp")
        if self.ep > 1:
            mesh["dp_shard_in_ep", "tp"]._flatten("ep")
        return mesh
