"""Mixture-of-experts feed-forward: router, grouped experts, shared experts, local dispatch.

Shape suffixes: B batch, S sequence, D d_model, F expert hidden, E experts, G expert groups,
T tokens (B*S), K top_k, A assignments (T*K, or the kept ones after capacity drops).

Parallelism is applied from outside (parallel/): `experts` takes tokens already sorted by expert
plus per-expert counts, so expert parallelism can wrap it with all-to-all dispatch unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from scifm.model.config import MoEConfig
from scifm.model.layers import SwiGLU


def load_balance_loss(
    prob_sum_E: torch.Tensor, n_tokens: torch.Tensor, tokens_per_expert_E: torch.Tensor, top_k: int
) -> torch.Tensor:
    """Switch-style E * sum_e f_e * P_e from sums over a batch of n_tokens; 1.0 when routing is uniform.

    f_e = tokens_per_expert_E[e] / (n_tokens * top_k): share of the top-k assignments that chose e;
    P_e = prob_sum_E[e] / n_tokens: mean router probability of e.
    """
    E = prob_sum_E.shape[0]
    f_E = tokens_per_expert_E / (n_tokens * top_k)
    return E * (f_E * prob_sum_E / n_tokens).sum()


def router_z_sum(logits_TE: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of logsumexp(logits)^2; the z-loss (which keeps logits small) is its mean."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().sum()


def router_scores(logits_TE: torch.Tensor, score_func: str) -> tuple[torch.Tensor, torch.Tensor]:
    """-> scores_TE (what experts are chosen and weighted by), probs_TE (rows sum to 1: the
    load-balance loss's router probabilities)."""
    if score_func == "softmax":
        scores_TE = logits_TE.softmax(dim=-1)
        return scores_TE, scores_TE
    scores_TE = logits_TE.sigmoid()
    return scores_TE, scores_TE / scores_TE.sum(dim=-1, keepdim=True)


def sum_in_this_process(stat: torch.Tensor) -> torch.Tensor:
    """MoE.reduce_stats of a single process: its batch is the global batch."""
    return stat


class Router(nn.Module):
    """Top-k routing with optional group limit and an auxiliary-loss-free balancing bias."""

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.n_experts = cfg.n_experts
        self.top_k = cfg.top_k
        self.n_groups = cfg.n_groups
        self.topk_groups = cfg.topk_groups
        self.score_func = cfg.score_func
        self.route_scale = cfg.route_scale
        self.norm_topk_prob = cfg.norm_topk_prob
        self.router_fp32 = cfg.router_dtype == "fp32"
        self.bias_update_rate = cfg.bias_update_rate
        self.gate = nn.Linear(d_model, cfg.n_experts, bias=False)
        # used only to choose experts, never in the weights; persistent so resumed runs route alike
        self.register_buffer("expert_bias", torch.zeros(cfg.n_experts, dtype=torch.float32))

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> weights_TK (fp32), experts_TK (long), probs_TE (rows sum to 1, for the balance loss), logits_TE."""
        if self.router_fp32:
            # in fp32 whatever autocast or the module's dtype says: close scores choose experts
            with torch.autocast(x_TD.device.type, enabled=False):
                logits_TE = F.linear(x_TD.float(), self.gate.weight.float())
        else:
            logits_TE = self.gate(x_TD).float()
        scores_TE, probs_TE = router_scores(logits_TE, self.score_func)
        choice_TE = scores_TE.detach() + self.expert_bias
        if self.n_groups > 1:
            choice_TE = self._mask_groups(choice_TE)
        experts_TK = choice_TE.topk(self.top_k, dim=-1).indices
        weights_TK = scores_TE.gather(-1, experts_TK)
        if self.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return weights_TK * self.route_scale, experts_TK, probs_TE, logits_TE

    def _mask_groups(self, choice_TE: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3 group limit: experts outside the topk_groups best groups get -inf."""
        T = choice_TE.shape[0]
        choice_TGE = choice_TE.view(T, self.n_groups, -1)
        if self.score_func == "sigmoid":
            top2 = min(2, choice_TGE.shape[-1])
            group_score_TG = choice_TGE.topk(top2, dim=-1).values.sum(dim=-1)
        else:
            group_score_TG = choice_TGE.amax(dim=-1)
        top_groups_TG = group_score_TG.topk(self.topk_groups, dim=-1).indices
        drop_TG = torch.ones_like(group_score_TG, dtype=torch.bool).scatter_(1, top_groups_TG, False)
        return choice_TGE.masked_fill(drop_TG[:, :, None], float("-inf")).view(T, -1)

    @torch.no_grad()
    def update_bias(self, tokens_per_expert_E: torch.Tensor) -> None:
        """bias += rate * sign(mean_load - load): raises under-loaded experts, lowers busy ones.

        Pass counts summed over every data-parallel rank so that all ranks keep the same bias.
        """
        update_expert_bias(self.expert_bias, tokens_per_expert_E, self.bias_update_rate)


@torch.no_grad()
def update_expert_bias(expert_bias_E: torch.Tensor, tokens_per_expert_E: torch.Tensor, rate: float) -> None:
    """In place: expert_bias_E += rate * sign(mean_load - load) (nothing at rate 0)."""
    if rate == 0:
        return
    load_E = tokens_per_expert_E.to(expert_bias_E)
    expert_bias_E.add_(rate * torch.sign(load_E.mean() - load_E))


_GROUPED_MM_OK: dict[tuple[str, torch.dtype, int, int], bool] = {}


def _grouped_mm_works(w_EIO: torch.Tensor) -> bool:
    """Probe once per (device, dtype, shape): kernels differ in dtypes and alignment they accept."""
    key = (w_EIO.device.type, w_EIO.dtype, w_EIO.shape[1], w_EIO.shape[2])
    if key not in _GROUPED_MM_OK:
        try:
            x_1I = torch.zeros(1, w_EIO.shape[1], dtype=w_EIO.dtype, device=w_EIO.device)
            w_1IO = torch.zeros(1, *w_EIO.shape[1:], dtype=w_EIO.dtype, device=w_EIO.device)
            offs = torch.ones(1, dtype=torch.int32, device=w_EIO.device)
            torch._grouped_mm(x_1I, w_1IO, offs=offs)
            _GROUPED_MM_OK[key] = True
        except (RuntimeError, NotImplementedError):
            _GROUPED_MM_OK[key] = False
    return _GROUPED_MM_OK[key]


# x_AD (rows sorted by expert), w_EXY (one weight per expert), tokens_per_expert_E -> y_AY
ExpertGemm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class GroupedExperts(nn.Module):
    """E SwiGLU experts as stacked weights, run as one grouped GEMM over expert-sorted tokens."""

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        # False forces the per-expert fallback (tests, builds without a usable grouped GEMM)
        self.use_grouped_mm = hasattr(torch, "_grouped_mm")
        # set from outside to replace the experts' three GEMMs (e.g. by FP8 ones)
        self.expert_gemm: ExpertGemm | None = None
        for w in (self.w1, self.w3, self.w2):
            bound = 1.0 / math.sqrt(w.shape[1])  # nn.Linear's default range, per expert
            nn.init.uniform_(w, -bound, bound)

    def forward(self, x_AD: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """x_AD sorted by expert; tokens_per_expert_E[e] rows belong to expert e (zeros allowed)."""
        return swiglu_experts(x_AD, tokens_per_expert_E, self.w1, self.w3, self.w2, self.use_grouped_mm,
                              self.expert_gemm)


def swiglu_experts(
    x_AD: torch.Tensor,
    tokens_per_expert_E: torch.Tensor,
    w1_EDF: torch.Tensor,
    w3_EDF: torch.Tensor,
    w2_EFD: torch.Tensor,
    use_grouped_mm: bool,
    expert_gemm: ExpertGemm | None = None,
) -> torch.Tensor:
    """SwiGLU of expert e on its tokens_per_expert_E[e] rows of x_AD (sorted by expert).

    A function of the weights so that expert parallelism can run it on this rank's experts.
    `expert_gemm` (GroupedExperts.expert_gemm) replaces the grouped GEMM. Under autocast every
    path computes in the autocast dtype and returns it.
    """
    if x_AD.shape[0] == 0:  # a rank that received no rows under EP: the grouped kernels refuse empty
        # operands. The rows and every weight still get their (zero) gradients, so each rank runs the
        # same backward, the collectives that brought the rows among it
        anchor = x_AD.sum() + w1_EDF.sum() + w3_EDF.sum() + w2_EFD.sum()
        return x_AD.new_zeros(0, w2_EFD.shape[-1]) + 0 * anchor
    device_type = x_AD.device.type
    gemm = expert_gemm
    if torch.is_autocast_enabled(device_type):
        # autocast does not cover _grouped_mm, and the tokens arrive in fp32 (from RMSNorm): cast as
        # autocast casts an nn.Linear, so the grouped GEMM does not run in fp32 (the weights stay
        # fp32). An expert_gemm takes the weights as they are and casts them as it needs.
        dtype = torch.get_autocast_dtype(device_type)
        x_AD = x_AD.to(dtype)
        if gemm is None:
            w1_EDF, w3_EDF, w2_EFD = (t.to(dtype) for t in (w1_EDF, w3_EDF, w2_EFD))
    counts = tokens_per_expert_E
    if gemm is None:
        if use_grouped_mm and _grouped_mm_usable((w1_EDF, w3_EDF, w2_EFD)):
            gemm = grouped_gemm
        else:  # the counts read once for the three GEMMs: under compile each read is new unbacked sizes
            gemm, counts = looped_gemm, tokens_per_expert_E.tolist()
    h_AF = F.silu(gemm(x_AD, w1_EDF, counts)) * gemm(x_AD, w3_EDF, counts)
    return gemm(h_AF, w2_EFD, counts)


def grouped_gemm(x_AD: torch.Tensor, w_EDF: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """One kernel whatever the counts, so every rank issues identical work under EP/TP."""
    return torch._grouped_mm(x_AD, w_EDF, offs=torch.cumsum(tokens_per_expert_E, dim=0, dtype=torch.int32))


def looped_gemm(x_AD: torch.Tensor, w_EDF: torch.Tensor, tokens_per_expert: torch.Tensor | list[int],
                mm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.matmul) -> torch.Tensor:
    """A loop over experts, not tokens; empty slices still run, so the op sequence is fixed."""
    if isinstance(tokens_per_expert, torch.Tensor):
        tokens_per_expert = tokens_per_expert.tolist()
    chunks = torch.split(x_AD, tokens_per_expert, dim=0)
    return torch.cat([mm(x_ND, w_EDF[e]) for e, x_ND in enumerate(chunks)], dim=0)


def _grouped_mm_usable(weights: tuple[torch.Tensor, ...]) -> bool:
    if torch.compiler.is_compiling():
        # compile traces _grouped_mm's meta kernel, which accepts only bf16 (eager CPU also takes fp32)
        return weights[0].dtype == torch.bfloat16
    return all(_grouped_mm_works(w) for w in weights)


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on the hidden state; backward also sends d(total)/d(aux) = 1 to the aux loss.

    This lets the router's auxiliary losses reach the optimizer without being returned, so
    pipeline stages pass only hidden states.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        return grad_x, torch.full((), ctx.scale, dtype=torch.float32, device=grad_x.device), None


class RoutingStatistics(nn.Module):
    """One MoE layer's auxiliary losses and routing statistics, from what its router computed.

    The auxiliary losses are nonlinear in batch statistics, so they are computed from sums that
    `reduce_stats` takes over the global batch: under data parallelism parallel/ sets it to an
    all-reduce and every rank gets the loss of the whole batch, as one process would.

    After each forward, `last_stats` holds detached tensors, all over the global batch:
      tokens_per_expert [E] float: top-k assignments routed to each expert (before capacity drops)
      dropped_tokens    scalar: assignments dropped by the capacity limit
      load_balance_loss scalar: already multiplied by aux_loss_coef
      z_loss            scalar: already multiplied by z_loss_coef
    Training forwards also add tokens_per_expert into `tokens_per_expert_acc` for the bias update.
    Activation-checkpoint recompute counts a layer twice, which does not change sign(mean - load).

    MoE below is one; a layer computed by other code (an engine's) can keep its statistics in one too.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.n_experts = cfg.n_experts
        self.top_k = cfg.top_k
        self.aux_loss_coef = cfg.aux_loss_coef
        self.z_loss_coef = cfg.z_loss_coef
        self.register_buffer("tokens_per_expert_acc", torch.zeros(cfg.n_experts), persistent=False)
        self.last_stats: dict[str, torch.Tensor] = {}
        # the trainer sets 1 / micro-batches per step, so aux losses are averaged like the LM loss
        self.aux_grad_scale = 1.0
        # sums a statistic over every token of the global batch; identity in one process
        self.reduce_stats: Callable[[torch.Tensor], torch.Tensor] = sum_in_this_process

    def attach_aux_losses(self, x: torch.Tensor, probs_TE: torch.Tensor, logits_TE: torch.Tensor,
                          routed_E: torch.Tensor, n_dropped: int) -> torch.Tensor:
        """x unchanged, with the load-balance and z-losses attached to its backward (probs_TE and
        logits_TE as Router.forward returns them, routed_E the assignments per expert); records the
        statistics."""
        lb_loss, z_loss, counts_E, dropped = self._aux_losses(probs_TE, logits_TE, routed_E, n_dropped)
        self._record_stats(counts_E, dropped, lb_loss, z_loss)
        return _AttachAuxLoss.apply(x, lb_loss + z_loss, self.aux_grad_scale)

    def _aux_losses(
        self, probs_TE: torch.Tensor, logits_TE: torch.Tensor, routed_E: torch.Tensor, n_dropped: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> load-balance loss, z-loss, routed counts [E], dropped count; all over the global batch."""
        E = self.n_experts
        # one reduction per layer; float64 keeps the counts exact at any batch size
        local = torch.cat([
            probs_TE.sum(dim=0).double(),
            router_z_sum(logits_TE).double()[None],
            routed_E.double(),
            torch.tensor([logits_TE.shape[0], n_dropped], dtype=torch.float64, device=routed_E.device),
        ])
        prob_sum_E, z_sum, counts_E, n_tokens, dropped = self.reduce_stats(local).split([E, 1, E, 1, 1])
        counts_E, n_tokens = counts_E.detach(), n_tokens.detach()
        lb_loss = self.aux_loss_coef * load_balance_loss(prob_sum_E, n_tokens, counts_E, self.top_k)
        z_loss = self.z_loss_coef * (z_sum / n_tokens).squeeze(0)
        return lb_loss.float(), z_loss.float(), counts_E.float(), dropped.detach().float().squeeze(0)

    @torch.no_grad()
    def _record_stats(
        self, routed_E: torch.Tensor, dropped: torch.Tensor, lb_loss: torch.Tensor, z_loss: torch.Tensor
    ) -> None:
        if self.training:
            self.tokens_per_expert_acc.add_(routed_E)
        self.last_stats = {
            "tokens_per_expert": routed_E,
            "dropped_tokens": dropped,
            "load_balance_loss": lb_loss.detach(),
            "z_loss": z_loss.detach(),
        }

    def update_bias(self, tokens_per_expert_E: torch.Tensor) -> None:
        """The router's expert-bias update from a step's counts (pop_tokens_per_expert())."""
        raise NotImplementedError

    def pop_tokens_per_expert(self) -> torch.Tensor:
        """Counts accumulated since the last call (over micro-batches), then reset to zero."""
        counts_E = self.tokens_per_expert_acc.clone()
        self.tokens_per_expert_acc.zero_()
        return counts_E


class MoE(RoutingStatistics):
    """Routed experts (+ optional shared experts) replacing the dense feed-forward; its routing
    statistics and auxiliary losses as RoutingStatistics describes."""

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__(cfg)
        self.capacity_factor = cfg.capacity_factor
        self.router = Router(d_model, cfg)
        self.experts = GroupedExperts(cfg.n_experts, d_model, cfg.expert_ffn)
        self.shared_experts = (
            SwiGLU(d_model, cfg.n_shared_experts * cfg.expert_ffn) if cfg.n_shared_experts > 0 else None
        )

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(-1, D)
        weights_TK, experts_TK, probs_TE, logits_TE = self.router(x_TD)

        experts_A = experts_TK.reshape(-1)
        weights_A = weights_TK.reshape(-1)
        routed_E = torch.zeros(self.n_experts, dtype=torch.long, device=x_TD.device)
        routed_E.scatter_add_(0, experts_A, torch.ones_like(experts_A))
        order_A, counts_E = self._sort_assignments(experts_A, weights_A, routed_E)

        token_A = order_A // self.top_k
        # weighted and summed in the input's dtype (fp32 under autocast, where the experts give bf16
        # rows): index_add_ takes one dtype, and the sum over top_k keeps the input's precision
        y_AD = self.experts(x_TD[token_A], counts_E).to(x_TD.dtype)
        y_AD = y_AD * weights_A[order_A, None].to(y_AD.dtype)
        out_TD = torch.zeros_like(x_TD).index_add_(0, token_A, y_AD)
        if self.shared_experts is not None:
            out_TD = out_TD + self.shared_experts(x_TD)

        n_dropped = experts_A.numel() - order_A.numel()
        return self.attach_aux_losses(out_TD.view(B, S, D), probs_TE, logits_TE, routed_E, n_dropped)

    def _sort_assignments(
        self, experts_A: torch.Tensor, weights_A: torch.Tensor, routed_E: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> assignment indices sorted by expert (capacity drops removed), rows per expert."""
        # the limit caps expert load in training only: evaluation runs every assignment, so a
        # token's output does not depend on how many others share its batch (or a KV-cache step)
        if self.capacity_factor <= 0 or not self.training:
            return torch.argsort(experts_A, stable=True), routed_E
        # within each expert, highest router weight first, so the limit keeps the strongest
        by_weight_A = torch.argsort(weights_A.detach(), descending=True, stable=True)
        order_A = by_weight_A[torch.argsort(experts_A[by_weight_A], stable=True)]
        n_tokens = experts_A.numel() // self.top_k
        capacity = math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)
        start_E = torch.cumsum(routed_E, dim=0) - routed_E
        rank_A = torch.arange(order_A.numel(), device=order_A.device) - start_E[experts_A[order_A]]
        return order_A[rank_A < capacity], routed_E.clamp(max=capacity)

    def update_bias(self, tokens_per_expert_E: torch.Tensor) -> None:
        """See Router.update_bias; typically fed with pop_tokens_per_expert() after each step."""
        self.router.update_bias(tokens_per_expert_E)
