"""MoE: grouped experts vs a per-token reference, routing, balancing, losses, capacity, shared experts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scifm.model.config import MoEConfig
from scifm.model.moe import GroupedExperts, MoE, Router, load_balance_loss, router_z_sum

HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def _expert_ref(x_D: torch.Tensor, e: int, w1, w2, w3) -> torch.Tensor:
    return (F.silu(x_D @ w1[e]) * (x_D @ w3[e])) @ w2[e]


def _identity_router(moe_or_router, logits_TE: torch.Tensor) -> None:
    """Make the gate an identity so inputs are the router logits."""
    router = moe_or_router.router if isinstance(moe_or_router, MoE) else moe_or_router
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(logits_TE.shape[1]))


@pytest.mark.parametrize("use_grouped_mm", [True, False])
def test_grouped_experts_match_per_token_reference(use_grouped_mm: bool, monkeypatch) -> None:
    if use_grouped_mm and not HAS_GROUPED_MM:
        pytest.skip("this torch build has no torch._grouped_mm")
    torch.manual_seed(0)
    experts = GroupedExperts(n_experts=5, dim=8, hidden=12)
    experts.use_grouped_mm = use_grouped_mm
    calls = []
    if HAS_GROUPED_MM:
        real = torch._grouped_mm
        monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    counts_E = torch.tensor([3, 0, 4, 0, 2])  # experts 1 and 3 get no tokens
    x_AD = torch.randn(int(counts_E.sum()), 8, requires_grad=True)
    grad_AD = torch.randn(x_AD.shape[0], 8)

    y_AD = experts(x_AD, counts_E)
    (y_AD * grad_AD).sum().backward()
    assert bool(calls) == use_grouped_mm  # really took the path under test

    params = [experts.w1, experts.w2, experts.w3]
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    x_ref = x_AD.detach().clone().requires_grad_()
    expert_of_row = torch.repeat_interleave(torch.arange(5), counts_E).tolist()
    y_ref = torch.stack([
        _expert_ref(x_ref[a], e, ref_params[0], ref_params[1], ref_params[2]) for a, e in enumerate(expert_of_row)
    ])
    (y_ref * grad_AD).sum().backward()

    torch.testing.assert_close(y_AD, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_AD.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    for p, ref in zip(params, ref_params):
        torch.testing.assert_close(p.grad, ref.grad, atol=1e-5, rtol=1e-5)
    assert experts.w1.grad[1].abs().max() == 0 and experts.w2.grad[3].abs().max() == 0


@pytest.mark.parametrize("use_grouped_mm", [True, False])
def test_experts_take_no_rows(use_grouped_mm: bool) -> None:
    """A rank that receives no tokens under EP: torch._grouped_mm's backward refuses an empty
    operand; the experts return no rows and every weight gets a zero gradient."""
    torch.manual_seed(0)
    experts = GroupedExperts(n_experts=4, dim=16, hidden=16)
    experts.use_grouped_mm = use_grouped_mm
    x_AD = torch.randn(0, 16, requires_grad=True)
    y_AD = experts(x_AD, torch.zeros(4, dtype=torch.long))
    y_AD.sum().backward()
    assert y_AD.shape == (0, 16) and x_AD.grad.shape == (0, 16)
    for w in (experts.w1, experts.w3, experts.w2):
        assert w.grad is not None and not w.grad.any()


@pytest.mark.parametrize("use_grouped_mm", [True, False])
def test_moe_matches_per_token_reference(use_grouped_mm: bool) -> None:
    if use_grouped_mm and not HAS_GROUPED_MM:
        pytest.skip("this torch build has no torch._grouped_mm")
    torch.manual_seed(1)
    cfg = MoEConfig(n_experts=6, top_k=2, expert_ffn=16, n_shared_experts=1, score_func="sigmoid",
                    route_scale=2.5, norm_topk_prob=True, aux_loss_coef=0.0, z_loss_coef=0.0)
    moe = MoE(16, cfg)
    moe.experts.use_grouped_mm = use_grouped_mm
    x_BSD = torch.randn(2, 5, 16, requires_grad=True)
    y_BSD = moe(x_BSD)
    y_BSD.sum().backward()

    x_TD = x_BSD.detach().reshape(-1, 16)
    weights_TK, experts_TK, _, _ = moe.router(x_TD)
    e = moe.experts
    y_ref = torch.stack([
        sum(weights_TK[t, k] * _expert_ref(x_TD[t], int(experts_TK[t, k]), e.w1, e.w2, e.w3) for k in range(2))
        for t in range(x_TD.shape[0])
    ]) + moe.shared_experts(x_TD)
    torch.testing.assert_close(y_BSD.reshape(-1, 16), y_ref, atol=1e-5, rtol=1e-5)
    assert moe.last_stats["tokens_per_expert"].sum() == 10 * 2
    assert moe.router.gate.weight.grad.abs().sum() > 0


def test_softmax_routing_picks_largest_logits() -> None:
    router = Router(4, MoEConfig(n_experts=4, top_k=2, score_func="softmax", route_scale=1.0))
    logits_TE = torch.tensor([[0.1, 3.0, 2.0, -1.0], [5.0, 0.0, 0.5, 4.0]])
    _identity_router(router, logits_TE)
    weights_TK, experts_TK, probs_TE, _ = router(logits_TE)
    assert experts_TK.tolist() == [[1, 2], [0, 3]]
    probs_ref = logits_TE.softmax(-1)
    torch.testing.assert_close(weights_TK, probs_ref.gather(1, experts_TK))  # not renormalised
    torch.testing.assert_close(probs_TE, probs_ref)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_sigmoid_routing_renormalises_and_scales(norm_topk_prob: bool) -> None:
    router = Router(4, MoEConfig(n_experts=4, top_k=2, score_func="sigmoid", route_scale=2.0,
                                 norm_topk_prob=norm_topk_prob))
    logits_TE = torch.tensor([[0.1, 3.0, 2.0, -1.0]])
    _identity_router(router, logits_TE)
    weights_TK, experts_TK, _, _ = router(logits_TE)
    assert experts_TK.tolist() == [[1, 2]]
    s1, s2 = 1 / (1 + math.exp(-3.0)), 1 / (1 + math.exp(-2.0))
    total = s1 + s2 if norm_topk_prob else 1.0
    torch.testing.assert_close(weights_TK, torch.tensor([[2 * s1 / total, 2 * s2 / total]]))


def test_softmax_routing_renormalised_top_k() -> None:
    # Qwen3-MoE's norm_topk_prob: the chosen probabilities sum to 1 (times route_scale)
    router = Router(4, MoEConfig(n_experts=4, top_k=2, score_func="softmax", norm_topk_prob=True))
    logits_TE = torch.tensor([[0.1, 3.0, 2.0, -1.0]])
    _identity_router(router, logits_TE)
    weights_TK, _, probs_TE, _ = router(logits_TE)
    p_K = probs_TE[0, [1, 2]]
    torch.testing.assert_close(weights_TK[0], p_K / p_K.sum())


def test_fp32_router_ignores_autocast() -> None:
    # GLM-4.5 routes in fp32: under bf16 autocast the logits are those of fp32, not of bf16
    router = Router(16, MoEConfig(n_experts=4, top_k=2, router_dtype="fp32"))
    x_TD = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits_fp32 = router(x_TD)[3]
        router.router_fp32 = False
        logits_bf16 = router(x_TD)[3]
    torch.testing.assert_close(logits_fp32, x_TD @ router.gate.weight.T, rtol=1e-6, atol=1e-6)
    assert (logits_bf16 - logits_fp32).abs().max() > 1e-4


def test_group_limited_routing_hand_case() -> None:
    # 4 groups of 2. Sigmoid group score = sum of top-2: g0 has the single best expert (0) but a
    # weak partner; g1 and g2 win on their sums, so expert 0 must not be chosen.
    cfg = MoEConfig(n_experts=8, top_k=2, n_groups=4, topk_groups=2, score_func="sigmoid")
    router = Router(8, cfg)
    logits_TE = torch.tensor([[5.0, -5.0, 2.0, 1.9, 1.5, 1.5, 0.0, 0.0]])
    _identity_router(router, logits_TE)
    _, experts_TK, _, _ = router(logits_TE)
    assert sorted(experts_TK[0].tolist()) == [2, 3]
    # softmax groups score by their max: group 0 now qualifies and expert 0 is picked
    router_sm = Router(8, MoEConfig(n_experts=8, top_k=2, n_groups=4, topk_groups=2, score_func="softmax"))
    _identity_router(router_sm, logits_TE)
    _, experts_TK, _, _ = router_sm(logits_TE)
    assert sorted(experts_TK[0].tolist()) == [0, 2]


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_group_limited_routing_stays_in_top_groups(score_func: str) -> None:
    torch.manual_seed(2)
    cfg = MoEConfig(n_experts=16, top_k=4, n_groups=4, topk_groups=2, score_func=score_func)
    router = Router(16, cfg)
    logits_TE = torch.randn(200, 16) * 3
    _identity_router(router, logits_TE)
    _, experts_TK, _, _ = router(logits_TE)
    scores_TGE = (logits_TE.softmax(-1) if score_func == "softmax" else logits_TE.sigmoid()).view(200, 4, 4)
    if score_func == "sigmoid":
        group_TG = scores_TGE.topk(2, dim=-1).values.sum(-1)
    else:
        group_TG = scores_TGE.amax(-1)
    top_groups_TG = group_TG.topk(2, dim=-1).indices
    for t in range(200):
        assert set((experts_TK[t] // 4).tolist()) <= set(top_groups_TG[t].tolist())
    # without the limit, some tokens do pick outside those groups (so the check above has teeth)
    free = Router(16, MoEConfig(n_experts=16, top_k=4, score_func=score_func))
    _identity_router(free, logits_TE)
    _, free_TK, _, _ = free(logits_TE)
    assert any(not set((free_TK[t] // 4).tolist()) <= set(top_groups_TG[t].tolist()) for t in range(200))


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_bias_changes_selection_not_weights(score_func: str) -> None:
    router = Router(4, MoEConfig(n_experts=4, top_k=2, score_func=score_func,
                                 norm_topk_prob=score_func == "sigmoid"))
    logits_TE = torch.tensor([[0.1, 3.0, 2.0, -1.0]])
    _identity_router(router, logits_TE)
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    weights_TK, experts_TK, _, _ = router(logits_TE)
    assert experts_TK.tolist() == [[3, 1]]
    if score_func == "softmax":
        ref_K = logits_TE.softmax(-1)[0, [3, 1]]
    else:
        s_K = logits_TE.sigmoid()[0, [3, 1]]
        ref_K = s_K / s_K.sum()
    torch.testing.assert_close(weights_TK[0], ref_K)


def test_update_bias_moves_toward_underloaded_experts() -> None:
    router = Router(4, MoEConfig(n_experts=4, top_k=1, bias_update_rate=0.1))
    router.update_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]))  # mean 5
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    moe = MoE(4, MoEConfig(n_experts=4, top_k=1, expert_ffn=4, bias_update_rate=0.1))
    moe.update_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]))
    torch.testing.assert_close(moe.router.expert_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    off = Router(4, MoEConfig(n_experts=4, top_k=1, bias_update_rate=0.0))
    off.update_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]))
    assert off.expert_bias.abs().sum() == 0


def test_token_accumulator_reads_and_resets() -> None:
    moe = MoE(8, MoEConfig(n_experts=4, top_k=2, expert_ffn=8))
    x_BSD = torch.randn(1, 3, 8)
    moe(x_BSD)
    moe(x_BSD)
    counts_E = moe.pop_tokens_per_expert()
    assert counts_E.sum() == 2 * 3 * 2
    torch.testing.assert_close(counts_E, 2 * moe.last_stats["tokens_per_expert"])
    assert moe.pop_tokens_per_expert().sum() == 0
    moe.eval()
    moe(x_BSD)
    assert moe.pop_tokens_per_expert().sum() == 0  # eval forwards do not steer the bias


def test_losses_equal_hand_computed_values() -> None:
    logits = [[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]]
    logits_TE = torch.tensor(logits)
    # top-1 choices: token0 -> e0, token1 -> e1 ; f = [1/2, 1/2, 0]
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits]
    P = [(probs[0][e] + probs[1][e]) / 2 for e in range(3)]
    lb_ref = 3 * (0.5 * P[0] + 0.5 * P[1])
    z_ref = sum(math.log(sum(math.exp(u) for u in row)) ** 2 for row in logits) / 2
    torch.testing.assert_close(
        load_balance_loss(logits_TE.softmax(-1).sum(0), torch.tensor(2.0), torch.tensor([1.0, 1.0, 0.0]), 1),
        torch.tensor(lb_ref))
    torch.testing.assert_close(router_z_sum(logits_TE) / 2, torch.tensor(z_ref))

    cfg = MoEConfig(n_experts=3, top_k=1, expert_ffn=4, aux_loss_coef=0.5, z_loss_coef=0.25)
    moe = MoE(3, cfg)
    _identity_router(moe, logits_TE)
    moe(logits_TE[None])
    torch.testing.assert_close(moe.last_stats["load_balance_loss"], torch.tensor(0.5 * lb_ref))
    torch.testing.assert_close(moe.last_stats["z_loss"], torch.tensor(0.25 * z_ref))
    assert moe.last_stats["tokens_per_expert"].tolist() == [1.0, 1.0, 0.0]


def test_aux_loss_gradient_reaches_router_through_output_only() -> None:
    torch.manual_seed(3)
    x_BSD = torch.randn(2, 6, 8)

    def router_grad(aux: float, z: float) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(4)
        moe = MoE(8, MoEConfig(n_experts=4, top_k=2, expert_ffn=8, aux_loss_coef=aux, z_loss_coef=z))
        y_BSD = moe(x_BSD)
        y_BSD.sum().backward()
        return moe.router.gate.weight.grad.clone(), y_BSD.detach()

    g0, y0 = router_grad(0.0, 0.0)
    g1, y1 = router_grad(0.3, 0.2)
    torch.testing.assert_close(y0, y1)  # the attached loss does not change the forward

    # the difference is exactly the gradient of coef-weighted losses w.r.t. the gate
    torch.manual_seed(4)
    moe = MoE(8, MoEConfig(n_experts=4, top_k=2, expert_ffn=8))
    _, experts_TK, probs_TE, logits_TE = moe.router(x_BSD.reshape(-1, 8))
    counts_E = torch.bincount(experts_TK.reshape(-1), minlength=4).float()
    n_tokens = torch.tensor(float(probs_TE.shape[0]))
    aux = 0.3 * load_balance_loss(probs_TE.sum(0), n_tokens, counts_E, 2) + 0.2 * router_z_sum(logits_TE) / n_tokens
    (g_aux,) = torch.autograd.grad(aux, moe.router.gate.weight)
    assert g_aux.abs().sum() > 1e-4
    torch.testing.assert_close(g1 - g0, g_aux, atol=1e-6, rtol=1e-5)


def test_capacity_factor_drops_lowest_weight_assignments() -> None:
    # 8 tokens, top-1, 4 experts, capacity ceil(1.0 * 8 * 1 / 4) = 2; every token prefers expert 0
    cfg = MoEConfig(n_experts=4, top_k=1, expert_ffn=8, capacity_factor=1.0)
    moe = MoE(4, cfg)
    logits_TE = torch.zeros(8, 4)
    logits_TE[:, 0] = torch.tensor([1.0, 5.0, 2.0, 7.0, 3.0, 1.5, 0.5, 2.5])
    _identity_router(moe, logits_TE)
    y_TD = moe(logits_TE[None])[0]
    assert moe.last_stats["dropped_tokens"].item() == 6
    assert moe.last_stats["tokens_per_expert"].tolist() == [8.0, 0.0, 0.0, 0.0]
    kept = (y_TD.abs().sum(-1) > 0).nonzero().flatten().tolist()
    assert kept == [1, 3]  # the two highest router weights

    dropless = MoE(4, MoEConfig(n_experts=4, top_k=1, expert_ffn=8))
    dropless.load_state_dict(moe.state_dict())
    y_ref = dropless(logits_TE[None])[0]
    torch.testing.assert_close(y_TD[kept], y_ref[kept])
    assert dropless.last_stats["dropped_tokens"].item() == 0
    # evaluation is dropless: every token's output is the dropless one
    moe.eval()
    torch.testing.assert_close(moe(logits_TE[None])[0], y_ref)
    assert moe.last_stats["dropped_tokens"].item() == 0


def test_shared_experts_change_output_and_get_gradients() -> None:
    torch.manual_seed(5)
    moe = MoE(8, MoEConfig(n_experts=4, top_k=2, expert_ffn=8, n_shared_experts=2))
    assert moe.shared_experts.w1.weight.shape == (16, 8)
    routed_only = MoE(8, MoEConfig(n_experts=4, top_k=2, expert_ffn=8))
    routed_only.load_state_dict(moe.state_dict(), strict=False)
    x_BSD = torch.randn(2, 3, 8)
    y_BSD = moe(x_BSD)
    torch.testing.assert_close(y_BSD - routed_only(x_BSD), moe.shared_experts(x_BSD))
    assert moe.shared_experts(x_BSD).abs().sum() > 0
    y_BSD.pow(2).sum().backward()
    for p in moe.shared_experts.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("use_grouped_mm", [True, False])
def test_capacity_matches_per_token_reference_top2(use_grouped_mm: bool) -> None:
    if use_grouped_mm and not HAS_GROUPED_MM:
        pytest.skip("this torch build has no torch._grouped_mm")
    torch.manual_seed(6)
    cfg = MoEConfig(n_experts=4, top_k=2, expert_ffn=8, capacity_factor=0.75)
    moe = MoE(8, cfg)
    moe.experts.use_grouped_mm = use_grouped_mm
    x_TD = torch.randn(12, 8)
    y_TD = moe(x_TD[None])[0]

    weights_TK, experts_TK, _, _ = moe.router(x_TD)
    capacity = math.ceil(0.75 * 12 * 2 / 4)
    kept = set()
    for e in range(4):
        mine = [(t, k) for t in range(12) for k in range(2) if experts_TK[t, k] == e]
        mine.sort(key=lambda tk: -weights_TK[tk].item())
        kept.update(mine[:capacity])
    w = moe.experts
    y_ref = torch.stack([
        sum((weights_TK[t, k] * _expert_ref(x_TD[t], int(experts_TK[t, k]), w.w1, w.w2, w.w3)
             for k in range(2) if (t, k) in kept), torch.zeros(8))
        for t in range(12)
    ])
    assert moe.last_stats["dropped_tokens"].item() == 24 - len(kept) > 0
    torch.testing.assert_close(y_TD, y_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_grouped_mm", [True, False])
def test_experts_compute_in_the_autocast_dtype(use_grouped_mm: bool, monkeypatch) -> None:
    # autocast does not cover torch._grouped_mm and the tokens arrive in fp32: without the cast the
    # grouped path ran in fp32; the per-expert path's bf16 rows must be summed in the MoE's dtype
    if use_grouped_mm and not HAS_GROUPED_MM:
        pytest.skip("this torch build has no torch._grouped_mm")
    calls = []
    if HAS_GROUPED_MM:
        real = torch._grouped_mm
        monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(a[0].dtype) or real(*a, **k))
    torch.manual_seed(0)
    # fp32 routing: a bf16 gate could flip a near-tie and change which experts a token gets
    moe = MoE(32, MoEConfig(n_experts=4, top_k=2, expert_ffn=32, router_dtype="fp32", n_shared_experts=1))
    moe.experts.use_grouped_mm = use_grouped_mm
    x_BSD = torch.randn(2, 24, 32)
    counts_E = torch.tensor([10, 0, 20, 18])  # expert 1 gets no tokens
    x_AD = torch.randn(48, 32)

    y_ref_BSD, y_ref_AD = moe(x_BSD), moe.experts(x_AD, counts_E)
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_BSD = moe(x_BSD)
        y_AD = moe.experts(x_AD, counts_E)
    # three bf16 GEMMs per call (and a first call's probe of the bf16 kernel), or the loop
    assert calls == [torch.bfloat16] * len(calls) and (len(calls) >= 6 if use_grouped_mm else not calls)
    # the experts return bf16, computed as bf16 weights would compute them; the MoE sums in the
    # input's dtype (fp32)
    assert y_AD.dtype == torch.bfloat16 and y_BSD.dtype == torch.float32
    bf16_experts = GroupedExperts(4, 32, 32).to(torch.bfloat16)
    bf16_experts.load_state_dict(moe.experts.state_dict())
    bf16_experts.use_grouped_mm = use_grouped_mm
    assert torch.equal(y_AD, bf16_experts(x_AD.bfloat16(), counts_E))
    # bf16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3) and an expert rounds its input,
    # weights, both first GEMMs, the gate product and its output: the relative L2 error measured
    # 4.9e-3 to 6.4e-3 over 40 seeds, for the experts and for the MoE; 2e-2 leaves a 3x margin
    for y, ref in ((y_AD, y_ref_AD), (y_BSD, y_ref_BSD)):
        assert torch.isfinite(y).all()
        assert (y.float() - ref).norm() / ref.norm() < 2e-2

    # gradients reach the fp32 expert weights in fp32
    moe.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        moe(x_BSD).square().mean().backward()
    for w in (moe.experts.w1, moe.experts.w3, moe.experts.w2):
        assert w.dtype == w.grad.dtype == torch.float32
        assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
