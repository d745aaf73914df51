"""Megatron-Core interop, judged by Megatron's own modules: GPTModels built by scifm.megatron from scifm
configs take scifm's decoder tensors with a strict load, give them back bit for bit, and compute the
same logits as scifm's decoder.

Megatron's forward asks for CUDA in a few places that are not computation: it allocates buffers on
torch.cuda.current_device() and makes the default causal mask on "cuda" (a mask is always passed here).
Without CUDA the module fixture points current_device at the CPU, so the forward runs here, in fp32
and in bf16 (on CUDA where there is one).

Logit tolerance in fp32: 1e-5 absolute on CPU, on logits of size ~1. The two implementations round in
a different order (Megatron's attention is baddbmm + softmax, scifm's SDPA; Megatron applies an
expert's routing weight before its down projection, scifm after): measured at most 4e-7. On CUDA
1e-4, as fused fp32 kernels order their sums differently again. A layout error or a lost expert bias
moves the logits by 5e-2 or more (test_a_wrong_layout_is_visible_in_the_logits).
"""

from __future__ import annotations

import dataclasses
import functools
import subprocess
import sys

import pytest
import torch

from scifm.core.errors import CheckpointError, ConfigError
from scifm.megatron import layouts
from scifm.megatron.build import build_megatron_decoder
from scifm.megatron.config import megatron_config
from scifm.megatron.weights import from_megatron, split_encoders, to_megatron
from scifm.model.attention import document_causal_mask
from scifm.model.config import ModelConfig
from scifm.model.init import init_parameters
from scifm.model.multimodal import ScientificMoE

pytest.importorskip("megatron.core")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB_SIZES = {"total": 320, "text": 200, "latex": 64, "protein": 48}
FP32_TOL = dict(atol=1e-5 if DEVICE == "cpu" else 1e-4, rtol=0)


@functools.cache
def tiny() -> ModelConfig:
    from scifm.config import compose_run_config

    return compose_run_config(["experiment=tiny"]).model


def config(name: str) -> ModelConfig:
    """tiny: softmax top-2 of 8 (pre-softmax), one shared expert, first layer dense.
    sigmoid_groups: q/k norms, sigmoid routing limited to 2 of 4 groups with a scale and the expert bias,
    2 shared experts, head_dim != d_model / n_heads, partial and stretched RoPE, q/k/v biases, tied embeddings.
    softmax_groups: every layer MoE, softmax renormalised over the top-k, group-limited, no shared expert.
    dense: no MoE layer at all."""
    base = tiny()
    if name == "tiny":
        return base
    if name == "sigmoid_groups":
        moe = dataclasses.replace(base.moe, score_func="sigmoid", n_groups=4, topk_groups=2, top_k=4,
                                  norm_topk_prob=True, route_scale=2.5, n_shared_experts=2, router_dtype="fp32",
                                  bias_update_rate=1e-3)
        return dataclasses.replace(base, qk_norm=True, head_dim=48, rope_fraction=0.5, rope_scaling=4.0,
                                   attention_bias="qkv", tie_embeddings=True, moe=moe)
    if name == "softmax_groups":
        moe = dataclasses.replace(base.moe, norm_topk_prob=True, n_groups=4, topk_groups=2, top_k=2,
                                  n_shared_experts=0, route_scale=1.5)
        return dataclasses.replace(base, n_dense_layers=0, moe=moe)
    assert name == "dense"
    return dataclasses.replace(base, n_dense_layers=base.n_layers)


CONFIGS = ["tiny", "sigmoid_groups", "softmax_groups", "dense"]


@pytest.fixture(scope="module", autouse=True)
def megatron_parallel_state(tmp_path_factory):
    """One process of Megatron's parallel state (gloo, and NCCL for CUDA tensors where there is CUDA)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import initialize_rng_tracker
    from megatron.core.transformer.moe import moe_utils

    with pytest.MonkeyPatch.context() as patch:
        if not torch.cuda.is_available():
            patch.setattr(torch.cuda, "current_device", lambda: "cpu")
        if not moe_utils.HAVE_TE:
            # megatron-core 0.16.1's router reads te_general_gemm, which it binds only when Transformer
            # Engine imports; None selects its plain torch.mm path
            patch.setattr(moe_utils, "te_general_gemm", None, raising=False)
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        store = tmp_path_factory.mktemp("megatron") / "store"
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
        parallel_state.initialize_model_parallel()
        # forwards here are evaluation only (no dropout), so no RNG state is tracked
        initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
        yield
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def scifm_model(cfg: ModelConfig, seed: int = 0) -> ScientificMoE:
    """scifm's initialisation, then random values for what it starts at a constant (norms at 1, biases at 0),
    so that a swapped norm or bias shows; softmax expert biases stay 0 (Megatron's softmax router has none)."""
    model = ScientificMoE(cfg, VOCAB_SIZES)
    init_parameters(model, seed, cfg.init_std, cfg.n_layers)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            softmax_bias = name.endswith("expert_bias") and cfg.moe.score_func == "softmax"
            if t.dim() == 1 and not softmax_bias:
                t.copy_(t + 0.1 * torch.randn(t.shape, generator=gen))
    return model.eval()


def megatron_model(cfg: ModelConfig, params_dtype: torch.dtype = torch.float32):
    return build_megatron_decoder(cfg, VOCAB_SIZES["total"], params_dtype=params_dtype).eval()


def decoder_state(model: ScientificMoE) -> dict:
    decoder, encoders = split_encoders(model.state_dict())
    assert encoders and all(name.startswith("encoders.") for name in encoders)
    return decoder


def tensors(state: dict) -> dict:
    """A Megatron state dict without the always-empty `_extra_state` entries of its linears."""
    return {k: v for k, v in state.items() if not k.endswith("._extra_state")}


def assert_equal_states(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    unequal = [k for k in expected if not torch.equal(got[k].cpu(), expected[k].cpu())]
    assert not unequal, unequal


@pytest.mark.parametrize("name", CONFIGS)
def test_megatron_model_has_the_decoder_parameters_and_loads_them_strictly(name):
    cfg = config(name)
    ours = scifm_model(cfg)
    theirs = megatron_model(cfg)
    decoder_params = sum(p.numel() for n, p in ours.named_parameters() if not n.startswith("encoders."))
    assert sum(p.numel() for p in theirs.parameters()) == decoder_params

    converted = to_megatron(decoder_state(ours), cfg)
    theirs.load_state_dict(converted, strict=True)  # every Megatron tensor given, every shape equal
    assert_equal_states(tensors(theirs.state_dict()), converted)


@pytest.mark.parametrize("name", CONFIGS)
def test_scifm_megatron_scifm_round_trip_is_exact(name):
    cfg = config(name)
    ours = scifm_model(cfg, seed=3)
    theirs = megatron_model(cfg)
    theirs.load_state_dict(to_megatron(decoder_state(ours), cfg), strict=True)
    assert_equal_states(from_megatron(theirs.state_dict(), cfg), decoder_state(ours))


@pytest.mark.parametrize("name", CONFIGS)
def test_megatron_scifm_megatron_round_trip_is_exact(name):
    cfg = config(name)
    theirs = megatron_model(cfg)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        # Megatron's own random init; its constant-initialised norms and expert biases get random values
        for t in tensors(theirs.state_dict()).values():
            if t.dim() == 1:
                t.copy_(torch.randn(t.shape, generator=gen))
    original = tensors(theirs.state_dict())

    ours = ScientificMoE(cfg, VOCAB_SIZES)
    encoders = split_encoders(ours.state_dict())[1]
    ours.load_state_dict(from_megatron(theirs.state_dict(), cfg) | encoders, strict=True)
    assert_equal_states(to_megatron(decoder_state(ours), cfg), original)


def scifm_logits(model: ScientificMoE, ids_BS, doc_ids_BS, **inputs) -> torch.Tensor:
    # positions restart in every document, as scifm's packing makes them
    starts_BS = torch.ones_like(doc_ids_BS, dtype=torch.bool)
    starts_BS[:, 1:] = doc_ids_BS[:, 1:] != doc_ids_BS[:, :-1]
    index_BS = torch.arange(ids_BS.shape[1], device=ids_BS.device).expand_as(ids_BS)
    start_index_BS = torch.cummax(torch.where(starts_BS, index_BS, 0), dim=1).values
    with torch.no_grad():
        return model(ids_BS, index_BS - start_index_BS, doc_ids_BS, **inputs)


def megatron_logits(model, ids_BS, doc_ids_BS, **inputs) -> torch.Tensor:
    # Megatron's mask is True where attention is not allowed; its RoPE positions are 0..S-1
    positions_BS = torch.arange(ids_BS.shape[1], device=ids_BS.device).expand_as(ids_BS)
    with torch.no_grad():
        return model(ids_BS, positions_BS, ~document_causal_mask(doc_ids_BS), **inputs)


def packed_batch(device: str = DEVICE) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of 16 ids: the first packs two documents (10 + 6 ids), the second holds one."""
    ids_BS = torch.randint(0, VOCAB_SIZES["total"], (2, 16), generator=torch.Generator().manual_seed(7))
    doc_ids_BS = torch.zeros(2, 16, dtype=torch.long)
    doc_ids_BS[0, 10:] = 1
    return ids_BS.to(device), doc_ids_BS.to(device)


def paired_models(cfg: ModelConfig, device: str = DEVICE):
    ours = scifm_model(cfg).to(device)
    theirs = megatron_model(cfg)
    theirs.load_state_dict(to_megatron(decoder_state(ours), cfg), strict=True)
    return ours, theirs.to(device)


@pytest.fixture
def exact_fp32_matmuls(monkeypatch):
    if torch.cuda.is_available():
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.mark.parametrize("name", CONFIGS)
def test_megatron_computes_scifm_logits(name, exact_fp32_matmuls):
    ours, theirs = paired_models(config(name))
    ids_BS, doc_ids_BS = packed_batch()
    expected = scifm_logits(ours, ids_BS, doc_ids_BS)
    assert expected.abs().max() > 0.1  # large enough that a wrong layer would show
    torch.testing.assert_close(megatron_logits(theirs, ids_BS, doc_ids_BS), expected, **FP32_TOL)


def test_encoders_feed_the_megatron_decoder_through_decoder_input(exact_fp32_matmuls):
    """scifm embeds the ids and splices a LaTeX item's encoder output into its slots; Megatron's decoder
    takes that as decoder_input and gives the whole multimodal model's logits."""
    cfg = config("tiny")
    ours, theirs = paired_models(cfg)
    ids_BS, doc_ids_BS = packed_batch()
    slots = cfg.encoders.latex.slots
    latex = {"ids": torch.randint(0, VOCAB_SIZES["latex"], (1, 9)).to(DEVICE),
             "mask": torch.ones(1, 9, dtype=torch.bool, device=DEVICE)}
    inputs = dict(items={"latex": latex}, slot_index={"latex": torch.arange(2, 2 + slots, device=DEVICE)[None]})
    expected = scifm_logits(ours, ids_BS, doc_ids_BS, **inputs)
    assert not torch.allclose(expected, scifm_logits(ours, ids_BS, doc_ids_BS), **FP32_TOL)  # the item matters
    with torch.no_grad():
        spliced_SBM = ours.embed(ids_BS, inputs["items"], inputs["slot_index"]).transpose(0, 1)
    got = megatron_logits(theirs, ids_BS, doc_ids_BS, decoder_input=spliced_SBM)
    torch.testing.assert_close(got, expected, **FP32_TOL)


def test_a_wrong_layout_is_visible_in_the_logits(exact_fp32_matmuls):
    """The tolerance catches what a wrong mapping does: q, k and v concatenated whole instead of per
    query group, fc1 with the up rows before the gate rows, or the expert bias left at zero, move the
    logits by 5e-2 or more (measured: 0.9, 0.05, 0.1)."""
    cfg = config("sigmoid_groups")
    ours, theirs = paired_models(cfg)
    ids_BS, doc_ids_BS = packed_batch()
    expected = scifm_logits(ours, ids_BS, doc_ids_BS)
    state = decoder_state(ours)
    right = to_megatron(state, cfg)
    qkv_concatenated = {f"decoder.layers.{i}.self_attention.linear_qkv.weight":
                        torch.cat([state[f"layers.{i}.attention.w{p}.weight"] for p in "qkv"]) for i in range(cfg.n_layers)}
    up_first = {k: torch.cat(t.chunk(2)[::-1]) for k, t in right.items() if "linear_fc1" in k}
    no_bias = {k: torch.zeros_like(t) for k, t in right.items() if k.endswith("expert_bias")}
    for wrong in (qkv_concatenated, up_first, no_bias):
        theirs.load_state_dict(right | wrong, strict=True)
        assert (megatron_logits(theirs, ids_BS, doc_ids_BS) - expected).abs().max() > 1e-2


@pytest.mark.parametrize("overrides, key", [
    (dict(attention_bias="all"), "model.attention_bias"),
    (dict(moe=dict(capacity_factor=1.25)), "model.moe.capacity_factor"),
    (dict(moe=dict(bias_update_rate=1e-3)), "model.moe.bias_update_rate"),
    (dict(moe=dict(score_func="sigmoid", norm_topk_prob=False)), "model.moe.norm_topk_prob"),
    (dict(moe=dict(norm_topk_prob=True, top_k=1)), "model.moe.norm_topk_prob"),
    (dict(moe=dict(n_groups=4, topk_groups=2, top_k=4)), "model.moe.top_k"),
])
def test_settings_megatron_cannot_compute_are_refused_in_one_line(overrides, key):
    moe = dataclasses.replace(tiny().moe, **overrides.get("moe", {}))
    cfg = dataclasses.replace(tiny(), moe=moe, **{k: v for k, v in overrides.items() if k != "moe"})
    cfg.validate()  # a valid scifm model
    for convert in (megatron_config, functools.partial(to_megatron, {})):  # the weight map refuses it too
        with pytest.raises(ConfigError) as err:
            convert(cfg)
        assert str(err.value).startswith(f"{key}: ") and "\n" not in str(err.value)


def test_moe_settings_of_a_model_without_moe_layers_are_not_refused():
    cfg = dataclasses.replace(config("dense"), moe=dataclasses.replace(tiny().moe, capacity_factor=1.25))
    assert megatron_config(cfg).num_moe_experts is None


def _one_line(err: pytest.ExceptionInfo, *parts: str) -> None:
    assert "\n" not in str(err.value) and all(p in str(err.value) for p in parts), str(err.value)


def test_weight_mapping_names_the_tensor_it_cannot_map():
    cfg = config("tiny")
    model = scifm_model(cfg)
    state = model.state_dict()
    with pytest.raises(CheckpointError) as err:
        to_megatron(state, cfg)
    _one_line(err, "encoders.", "split_encoders")

    decoder = decoder_state(model)
    with pytest.raises(CheckpointError) as err:
        to_megatron({k: v for k, v in decoder.items() if k != "layers.2.attention.wk.weight"}, cfg)
    _one_line(err, "scifm tensor layers.2.attention.wk.weight is missing")

    biased = dict(decoder, **{"layers.1.moe.router.expert_bias": torch.ones(cfg.moe.n_experts)})
    with pytest.raises(CheckpointError) as err:
        to_megatron(biased, cfg)
    _one_line(err, "layers.1.moe.router.expert_bias is nonzero")

    converted = to_megatron(decoder, cfg)
    with pytest.raises(CheckpointError) as err:
        from_megatron(converted | {"decoder.layers.0.mlp.router.weight": torch.zeros(8, 128)}, cfg)
    _one_line(err, "megatron tensor decoder.layers.0.mlp.router.weight has no scifm counterpart")

    with pytest.raises(CheckpointError) as err:
        from_megatron(converted | {"output_layer._extra_state": torch.zeros(1)}, cfg)
    _one_line(err, "output_layer._extra_state holds extra state")


def test_untied_weights_are_refused_for_a_tied_config():
    cfg = config("sigmoid_groups")
    decoder = decoder_state(scifm_model(cfg))
    decoder["output.weight"] = decoder["output.weight"] + 1.0
    with pytest.raises(CheckpointError) as err:
        to_megatron(decoder, cfg)
    _one_line(err, "output.weight differs from tok_embeddings.weight")


def test_fused_qkv_puts_each_query_group_before_its_key_and_value():
    # 4 query heads, 2 kv heads, head_dim 1: rows q0 q1 k0 v0 | q2 q3 k1 v1
    q, k, v = torch.tensor([[0.0], [1], [2], [3]]), torch.tensor([[10.0], [11]]), torch.tensor([[20.0], [21]])
    fused = layouts.fuse_qkv(q, k, v, n_kv_heads=2)
    assert fused.flatten().tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    assert all(torch.equal(a, b) for a, b in zip(layouts.split_qkv(fused, 4, 2, 1), (q, k, v)))


def test_scifm_megatron_imports_without_megatron():
    code = ("import sys; sys.modules['megatron'] = None; "
            "import scifm.megatron.build, scifm.megatron.weights; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("device", [
    # without CUDA Megatron's forward runs on CPU (fixture above); with CUDA it moves CPU tensors there
    pytest.param("cpu", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="runs as the cuda case")),
    pytest.param("cuda", marks=pytest.mark.gpu),
])
@pytest.mark.parametrize("name", ["tiny", "sigmoid_groups"])
def test_bf16_logits(name, device, exact_fp32_matmuls):
    """Both models in bf16 from the same (bf16) weights; on CUDA with one NCCL process of Megatron's
    parallel state (the module fixture).

    Routing is made insensitive to bf16 rounding, which would otherwise flip near-tied expert choices
    between two implementations: tiny routes every token to all 8 experts (top_k = n_experts); the
    sigmoid model's expert bias (0, 1, ..., 7) outweighs any score difference (sigmoid is in (0, 1)), so
    it always picks the 4 experts of the 2 highest groups while the weights still come from the scores.

    Tolerance: 5% of the largest fp32 logit. bf16 keeps 8 significant bits (2**-9 relative per rounding);
    the two implementations round at different places (Megatron keeps RoPE's cos/sin, the router's
    probabilities and the normalised activation before its norm weight in bf16, scifm in fp32), dozens
    of times through 4 blocks. Measured on CPU: scifm's own bf16 error 0.6% and 0.4% of the largest
    logit, Megatron minus scifm 0.6% and 0.5%. scifm's own bf16 logits must meet the bound against
    fp32 too, which shows it is attainable on the device at hand; a layout error moves logits by O(1)
    (test_a_wrong_layout_is_visible_in_the_logits).
    """
    cfg = config(name)
    if name == "tiny":
        cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, top_k=cfg.moe.n_experts))
    ours = scifm_model(cfg)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(p.bfloat16().float())  # weights both models hold exactly
        for buffer_name, buffer in ours.named_buffers():
            if buffer_name.endswith("expert_bias") and cfg.moe.score_func == "sigmoid":
                buffer.copy_(torch.arange(cfg.moe.n_experts, dtype=torch.float32))
    theirs = megatron_model(cfg, params_dtype=torch.bfloat16)
    theirs.load_state_dict(to_megatron(decoder_state(ours), cfg), strict=True)
    theirs = theirs.to(device)
    ids_BS, doc_ids_BS = packed_batch(device)
    reference = scifm_logits(ours.to(device), ids_BS, doc_ids_BS)
    ours_bf16 = scifm_logits(ours.to(torch.bfloat16), ids_BS, doc_ids_BS).float()
    theirs_bf16 = megatron_logits(theirs, ids_BS, doc_ids_BS).float()
    bound = 0.05 * reference.abs().max()
    assert (ours_bf16 - reference).abs().max() < bound
    assert (theirs_bf16 - ours_bf16).abs().max() < bound
