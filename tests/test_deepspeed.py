"""parallel.engine=deepspeed: ZeRO 1, 2 and 3 (and offload) on two gloo processes give the one-process
native run's losses; its checkpoints are native ones, so they resume under DeepSpeed exactly, resume
under the native engine, come back from it, and export.

Tolerance: 1e-5 relative on each step's loss, as in the native parity tests. DeepSpeed sums the two
ranks' gradients where one process sums all micro-batches at once, so the float32 rounding differs
(measured: 1e-7 relative after 4 steps); a wrong scale, a missed rank or a lost moment is off by
1e-3 or more. Resuming DeepSpeed from its own checkpoint repeats the same operations: 1e-7.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from scifm.core.errors import ConfigError
from scifm.parallel.config import ParallelConfig
from scifm.parallel.deepspeed_engine import deepspeed_config, require_deepspeed
from scifm.train.export import export_checkpoint
from tests.test_parallel_train import losses, train_args, train_cli

pytest.importorskip("deepspeed")

DS = ("parallel.engine=deepspeed", "parallel.dp_shard=2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_losses(got: dict[int, float], want: dict[int, float], rel: float = 1e-5) -> None:
    assert got and set(got) <= set(want), (got, want)
    for step, loss in got.items():
        assert abs(loss - want[step]) <= rel * abs(want[step]), (step, got, want)


@pytest.fixture(scope="module")
def native(corpus_dir, tmp_path_factory):
    """One native process, 4 steps, checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("native")
    train_cli(1, run_dir, corpus_dir)
    return run_dir


# --- configuration ----------------------------------------------------------------------------

def derived(**overrides) -> dict:
    args = dict(zero_stage=2, offload_optimizer=False, offload_params=False, user_path="", micro_batch=4,
                grad_accum=2, grad_clip=1.5) | overrides
    return deepspeed_config(**args)


def test_scifm_derives_batch_accumulation_clipping_and_stage():
    cfg = derived(zero_stage=3, offload_optimizer=True, offload_params=True)
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["gradient_clipping"] == 1.5  # never DeepSpeed's default of 1.0
    assert cfg["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                        "offload_param": {"device": "cpu"}}
    assert cfg["managed_gradient_accumulation"] is False  # scifm's step is the accumulation boundary


def test_a_users_json_is_merged_and_a_disagreement_is_one_line(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True}, "wall_clock_breakdown": True,
                                "gradient_clipping": 1.5}))
    cfg = derived(user_path=str(path))
    assert cfg["zero_optimization"] == {"stage": 2, "overlap_comm": True} and cfg["wall_clock_breakdown"] is True
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError) as info:
        derived(user_path=str(path))
    text = str(info.value)
    assert "zero_optimization.stage=3" in text and "2" in text and "\n" not in text
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        derived(user_path=str(path))


@pytest.mark.parametrize("overrides, key", [
    (dict(tp=2), "parallel.tp"),
    (dict(pp=2), "parallel.pp"),
    (dict(ep=2), "parallel.ep"),
    (dict(mixed_precision="bf16"), "parallel.mixed_precision"),
    (dict(zero_stage=0), "parallel.deepspeed.zero_stage"),
    (dict(zero_stage=4), "parallel.deepspeed.zero_stage"),
    (dict(zero_stage=2, offload_params=True), "parallel.deepspeed.offload_params"),
])
def test_what_deepspeed_cannot_do_is_refused_naming_the_key(overrides, key):
    cfg = ParallelConfig(engine="deepspeed", dp_shard=2)
    for name, value in overrides.items():
        setattr(cfg.deepspeed if hasattr(cfg.deepspeed, name) else cfg, name, value)
    with pytest.raises(ConfigError) as info:
        cfg.validate(n_layers=4, n_microbatches=1)
    assert str(info.value).startswith(f"{key}: ") and "\n" not in str(info.value)


def test_without_deepspeed_installed_the_error_names_the_extra(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[deepspeed\]'"):
        require_deepspeed()


# --- training ---------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_matches_one_native_process_and_its_checkpoints_move_between_engines(
        stage, native, corpus_dir, tmp_path):
    want = losses(native)
    run = tmp_path / "ds"
    train_cli(2, run, corpus_dir, *DS, f"parallel.deepspeed.zero_stage={stage}")
    got = losses(run)
    assert sorted(got) == [1, 2, 3, 4]
    assert_same_losses(got, want)
    if stage == 1:  # the checkpoint holds the native run's weights under the native names
        ours = load_file(export_checkpoint(run / "checkpoints/step_4", tmp_path / "ds.safetensors"))
        theirs = load_file(export_checkpoint(native / "checkpoints/step_4", tmp_path / "native.safetensors"))
        assert ours.keys() == theirs.keys() and len(ours) > 300
        for name, t in ours.items():
            torch.testing.assert_close(t, theirs[name], rtol=1e-4, atol=1e-6, msg=name)
    if stage == 2:  # DeepSpeed resumes its own checkpoint exactly; the native engine resumes it too
        resumed = tmp_path / "ds-resumed"
        train_cli(2, resumed, corpus_dir, *DS, f"resume={run / 'checkpoints/step_2'}")
        assert sorted(losses(resumed)) == [3, 4]
        assert_same_losses(losses(resumed), got, rel=1e-7)
        on_native = tmp_path / "native-resumed"
        train_cli(1, on_native, corpus_dir, f"resume={run / 'checkpoints/step_2'}")
        assert_same_losses(losses(on_native), want)
    if stage == 3:  # a native checkpoint starts a DeepSpeed run with its moments and step count
        from_native = tmp_path / "from-native"
        train_cli(2, from_native, corpus_dir, *DS, "parallel.deepspeed.zero_stage=3",
                  f"resume={native / 'checkpoints/step_2'}")
        assert sorted(losses(from_native)) == [3, 4]
        assert_same_losses(losses(from_native), want)


@pytest.fixture(scope="module")
def cpu_adam_built():
    """DeepSpeed's CPU AdamW compiled here, once (about 2 minutes on 2 cores), not inside a training
    run's time limit; the runs find it in TORCH_EXTENSIONS_DIR (tests/conftest.py)."""
    from deepspeed.ops.op_builder import CPUAdamBuilder

    CPUAdamBuilder().load()


@pytest.mark.slow
def test_offloading_optimizer_and_parameters_matches_one_native_process(cpu_adam_built, native, corpus_dir, tmp_path):
    """ZeRO-3 with the optimizer (DeepSpeed's CPU AdamW) and the parameters offloaded; its AdamW
    rounds differently from torch's, which the 1e-5 tolerance covers with room."""
    run = tmp_path / "offload"
    train_cli(2, run, corpus_dir, *DS, "parallel.deepspeed.zero_stage=3", "parallel.deepspeed.offload_optimizer=true",
              "parallel.deepspeed.offload_params=true")
    assert sorted(losses(run)) == [1, 2, 3, 4]
    assert_same_losses(losses(run), losses(native))


@pytest.mark.slow
def test_deepspeeds_own_launcher_runs_the_same_training(native, corpus_dir, tmp_path):
    """`deepspeed --num_gpus 2 --module scifm.train ...` (it appends --local_rank=N, which scifm
    drops: the rank is in the environment) with activation checkpointing, whose wrappers rename the
    parameters: the checkpoint keeps the native names, so the native engine resumes it."""
    run = tmp_path / "launcher"
    cmd = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "scifm.train", *train_args(corpus_dir, run), *DS, "parallel.activation_checkpoint=full"]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_same_losses(losses(run), losses(native))
    resumed = tmp_path / "resumed"
    train_cli(1, resumed, corpus_dir, f"resume={run / 'checkpoints/step_2'}")
    assert sorted(losses(resumed)) == [3, 4]
    assert_same_losses(losses(resumed), losses(native))
