"""On a CUDA GPU (skipped elsewhere, with the reason): training in bf16 and in FP8 with every recipe
the GPU and the installed backends support, the grouped-GEMM experts, and NCCL with one GPU.
bench/gpu.sh runs these."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import SMALL_CORPUS_DOCS
from scifm.model.moe import swiglu_experts
from scifm.core.errors import ConfigError
from scifm.parallel.fp8 import resolve_fp8
from scifm.parallel.fp8_config import TE_RECIPES, TORCHAO_RECIPES, Fp8Config
from scifm.parallel.fp8_grouped import grouped_fp8_supported
from scifm.train.trainer import train

pytestmark = pytest.mark.gpu

STEPS = ("trainer.max_steps=40", "trainer.log_every=10", "trainer.val_every=1000", "trainer.ckpt_every=0",
         "trainer.batch_size=8", "data.seq_len=128", "data.val_batches=4", "trainer.device=cuda")


def fp8_recipes() -> list[tuple[str, str]]:
    """Every (backend, recipe) that resolve_fp8 accepts on this machine's GPU."""
    if not torch.cuda.is_available():
        return []
    runnable = []
    for backend, recipes in (("torchao", TORCHAO_RECIPES), ("te", TE_RECIPES)):
        for recipe in recipes:
            try:
                runnable.append(resolve_fp8(Fp8Config(backend=backend, recipe=recipe), torch.device("cuda")))
            except ConfigError:
                pass  # not installed, or not on this GPU
    return runnable


@pytest.fixture(scope="module")
def bf16_run(make_config, tmp_path_factory) -> tuple[dict, list[float]]:
    run_dir = tmp_path_factory.mktemp("bf16")
    summary = train(make_config(*STEPS, "trainer.precision=bf16"), run_dir)
    return summary, [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def bf16_loss(bf16_run) -> float:
    return bf16_run[0]["final_val_loss"]


def test_bf16_training_on_the_gpu_learns(bf16_run):
    summary, train_losses = bf16_run
    assert summary["steps"] == 40 and train_losses[-1] < train_losses[0] - 0.5, train_losses


@pytest.mark.parametrize("backend, recipe", fp8_recipes() or [pytest.param("", "", marks=pytest.mark.skip(
    reason="no FP8 backend installed, or no GPU of compute capability 8.9+"))])
def test_fp8_training_stays_within_1_percent_of_bf16(backend, recipe, bf16_loss, make_config, tmp_path):
    summary = train(make_config(*STEPS, "trainer.precision=fp8", f"trainer.fp8.backend={backend}",
                                f"trainer.fp8.recipe={recipe}"), tmp_path)
    assert summary["fp8"]["backend"] == backend and summary["fp8"]["linear_layers"] > 0
    grouped = grouped_fp8_supported(torch.device("cuda"))  # Hopper, Blackwell: grouped FP8 expert GEMMs
    assert summary["fp8"]["expert_blocks"] > 0 and summary["fp8"]["experts_kernels"].startswith(
        "grouped" if grouped else "per-expert"), summary["fp8"]
    assert abs(summary["final_val_loss"] / bf16_loss - 1) < 0.01, (summary["final_val_loss"], bf16_loss)
    if backend == "te":  # its modules' scaling state lies beside the weights, which a model without te loads
        from scifm.train.export import load_checkpoint_model

        ckpt = tmp_path / "checkpoints/step_40"
        assert torch.load(ckpt / "extra_state/rank0.pt", weights_only=True)
        load_checkpoint_model(ckpt)


def test_grouped_gemm_experts_match_the_per_expert_loop():
    torch.manual_seed(0)
    E, D, F, rows = 8, 256, 512, 1000
    w1, w3 = (torch.randn(E, D, F, device="cuda", dtype=torch.bfloat16) / D**0.5 for _ in range(2))
    w2 = torch.randn(E, F, D, device="cuda", dtype=torch.bfloat16) / F**0.5
    x = torch.randn(rows, D, device="cuda", dtype=torch.bfloat16)
    counts = torch.tensor([0, 300, 1, 99, 200, 0, 150, 250], device="cuda")
    grouped = swiglu_experts(x, counts, w1, w3, w2, use_grouped_mm=True)
    looped = swiglu_experts(x, counts, w1, w3, w2, use_grouped_mm=False)
    # both bf16 with fp32 accumulation; they differ in summation order only
    assert (grouped.float() - looped.float()).norm() / looped.float().norm() < 1e-2


def test_nccl_with_one_gpu(corpus_dir, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "scifm.train",
           "experiment=tiny", f"data.corpus_dir={corpus_dir}", f"data.corpus_max_docs_per_source={SMALL_CORPUS_DOCS}",
           "trainer.max_steps=3", "trainer.device=cuda", "trainer.precision=bf16", f"hydra.run.dir={tmp_path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 3
