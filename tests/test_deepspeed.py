"""parallel.engine=deepspeed: ZeRO 1, 2 and 3 (and offload) on two gloo processes give the one-process
native run's losses; its checkpoints are native ones, so they resume under DeepSpeed exactly, resume
under the native engine, come back from it, and export. With parallel.ep=2 (ZeRO 1 and 2) each rank
holds half the experts, and the same holds.

Tolerance: 1e-5 relative on each step's loss, as in the native parity tests. DeepSpeed sums the two
ranks' gradients where one process sums all micro-batches at once, so the float32 rounding differs
(measured: 1e-7 relative after 4 steps); a wrong scale, a missed rank or a lost moment is off by
1e-3 or more. Resuming DeepSpeed from its own checkpoint repeats the same operations: 1e-7.

Saved weights: 1e-4 relative plus 1e-5 absolute. Where a gradient is near zero, Adam's step is its
first moment over the root of its second, which float32 rounding moves most (measured on an AVX-512
CPU: one element in 16,384 off by 1.6e-6 after 4 steps; none past 1e-6 on AVX2). The smallest whole step in
these runs (warmup's first, lr 1.5e-4) is 15x the absolute tolerance, so a skipped or repeated
update still fails.

Gradient norms: 5e-5 relative. DeepSpeed sums the squares in float64; the native run takes each
tensor's norm with torch's float32 CPU kernel, which is 7.6e-5 low on the output layer's gradient
(against float64), so the native norms are 0.7e-5 to 1.2e-5 low (measured, steps 1-4; DeepSpeed's
norm equals the float64 norm of the native gradients to 1e-8). Expert gradients are 0.09% of the
squared norm here: counted twice they raise the norm by 4.6e-4, counted on one rank only or scaled
by 1 / ep they lower it by 2.3e-4 or more. Adam hardly notices a gradient's scale, so the losses
would not show such a mistake; the norm and the saved moments (1e-3 of each tensor's largest entry,
measured 2.4e-5; a scale of 1 / ep is off by 0.5) do.
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

from scifm.config import TrainerConfig
from scifm.core.errors import ConfigError
from scifm.parallel.config import DeepSpeedConfig, ParallelConfig
from scifm.parallel.deepspeed_engine import (
    deepspeed_config,
    deepspeed_optimizer,
    deepspeed_schedule_state,
    native_schedule_state,
    require_deepspeed,
)
from scifm.train.export import export_checkpoint
from scifm.train.optim import build_optimizer, build_scheduler, lr_factor
from scifm.train.sharded_state import OPTIMIZER_DIR, read_full_tensors
from tests.helpers.run_metrics import losses, records
from tests.test_parallel_train import train_args, train_cli

pytest.importorskip("deepspeed")

DS = ("parallel.engine=deepspeed", "parallel.dp_shard=2")
EP = (*DS, "parallel.ep=2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_losses(got: dict[int, float], want: dict[int, float], rel: float = 1e-5) -> None:
    assert got and set(got) <= set(want), (got, want)
    for step, loss in got.items():
        assert abs(loss - want[step]) <= rel * abs(want[step]), (step, got, want)


def expert_moments(ckpt) -> dict[str, torch.Tensor]:
    """The saved AdamW moments of the routed experts, whole."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    saved = HuggingFaceStorageReader(str(ckpt / OPTIMIZER_DIR)).read_metadata().state_dict_metadata
    return read_full_tensors(ckpt, OPTIMIZER_DIR, [n for n in saved if ".experts." in n and "::exp_avg" in n])


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


def test_expert_parallelism_keeps_zero_on_its_expert_reduction_path(tmp_path):
    """ZeRO 1/2 reduce expert gradients over their own group only on the contiguous reduce-scatter
    path, with DeepSpeed's expert groups laid out as scifm's mesh; a JSON asking otherwise is refused."""
    cfg = derived(experts=True)
    assert cfg["zero_optimization"] == {"stage": 2, "contiguous_gradients": True, "reduce_scatter": True}
    assert cfg["use_data_before_expert_parallelism"] is False
    assert "contiguous_gradients" not in derived()["zero_optimization"]
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"contiguous_gradients": False}}))
    with pytest.raises(ConfigError, match=r"zero_optimization\.contiguous_gradients=False"):
        derived(experts=True, user_path=str(path))


def test_experts_get_param_groups_of_their_own_and_checkpoints_keep_the_native_groups():
    """ZeRO takes expert parameters only in groups marked `moe` and named after their expert group;
    the checkpoint's schedule keeps one entry per native group, and a schedule resumed from it
    steps every group, the experts' included."""
    model = torch.nn.ModuleDict({"dense": torch.nn.Linear(4, 4), "experts": torch.nn.Linear(4, 4, bias=False)})
    model["experts"].weight.group_name = "ep_size_2"
    tc = TrainerConfig(lr=1e-3, warmup_steps=8, max_steps=10)

    def build():
        optimizer, origin = deepspeed_optimizer(build_optimizer(model, tc), DeepSpeedConfig(), "ep_size_2")
        return optimizer, build_scheduler(optimizer, tc), origin

    optimizer, scheduler, origin = build()
    groups = optimizer.param_groups
    assert origin == [0, 1, 0]  # decay, no decay, the experts taken out of decay
    assert groups[0]["params"] == [model["dense"].weight] and groups[1]["params"] == [model["dense"].bias]
    assert groups[2]["params"] == [model["experts"].weight] and groups[2]["moe"] and groups[2]["name"] == "ep_size_2"
    assert groups[2]["weight_decay"] == groups[0]["weight_decay"] == tc.weight_decay
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    saved = native_schedule_state(scheduler.state_dict(), origin)
    assert len(saved["base_lrs"]) == len(saved["_last_lr"]) == 2
    optimizer2, scheduler2, _ = build()
    scheduler2.load_state_dict(deepspeed_schedule_state(saved, origin))
    for s in (scheduler, scheduler2):
        s.optimizer.step()
        s.step()
    assert [g["lr"] for g in optimizer2.param_groups] == [tc.lr * lr_factor(3, tc)] * 3


@pytest.mark.parametrize("overrides, key", [
    (dict(tp=2), "parallel.tp"),
    (dict(pp=2), "parallel.pp"),
    (dict(ep=2, zero_stage=3), "parallel.ep"),
    (dict(ep=2, zero_stage=3, offload_params=True), "parallel.ep"),
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


@pytest.mark.parametrize("stage", [1, 2])
def test_expert_parallelism_is_taken_at_zero_1_and_2(stage):
    ParallelConfig(engine="deepspeed", dp_shard=2, ep=2, deepspeed=DeepSpeedConfig(zero_stage=stage)).validate(
        n_layers=4, n_microbatches=1)


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
            torch.testing.assert_close(t, theirs[name], rtol=1e-4, atol=1e-5, msg=name)
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


# --- expert parallelism -----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_expert_parallel_zero_stage_matches_one_native_process(stage, native, corpus_dir, tmp_path):
    """ep=2 on two processes: each rank holds half the experts, and the losses, gradient norms and
    expert moments are the one-process run's (tolerances in the module's docstring); at ZeRO-2 the
    run resumes from its own checkpoint as if it had not stopped."""
    run = tmp_path / "ep"
    train_cli(2, run, corpus_dir, *EP, f"parallel.deepspeed.zero_stage={stage}")
    want, got = records(native), records(run)
    assert sorted(got) == [1, 2, 3, 4]
    assert_same_losses(losses(run), losses(native))
    for step, r in got.items():
        assert abs(r["grad_norm"] - want[step]["grad_norm"]) <= 5e-5 * want[step]["grad_norm"], (step, r, want[step])
    memory, one = json.loads((run / "memory.json").read_text()), json.loads((native / "memory.json").read_text())
    assert [m["expert_param_bytes"] for m in memory.values()] == [one["rank0"]["expert_param_bytes"] // 2] * 2
    ours, theirs = expert_moments(run / "checkpoints/step_4"), expert_moments(native / "checkpoints/step_4")
    assert ours.keys() == theirs.keys() and len(ours) == 18  # 3 MoE layers x w1, w2, w3 x 2 moments, whole
    for name, t in ours.items():
        assert t.shape == theirs[name].shape, name
        assert (t - theirs[name]).abs().max() <= 1e-3 * theirs[name].abs().max(), name
    if stage == 2:
        resumed = tmp_path / "ep-resumed"
        train_cli(2, resumed, corpus_dir, *EP, f"resume={run / 'checkpoints/step_2'}")
        assert sorted(losses(resumed)) == [3, 4]
        assert_same_losses(losses(resumed), losses(run), rel=1e-7)


@pytest.mark.slow
def test_checkpoints_move_from_native_to_deepspeed_experts_and_back(native, corpus_dir, tmp_path):
    """A native checkpoint starts an ep=2 DeepSpeed run (each rank takes its block of the experts);
    that run's checkpoint (the experts gathered whole) resumes natively; both continue the native
    losses, and the weights it saves are the native run's."""
    ds = tmp_path / "ds-ep"
    train_cli(2, ds, corpus_dir, *EP, "parallel.deepspeed.zero_stage=1", "trainer.ckpt_every=1",
              f"resume={native / 'checkpoints/step_2'}")
    assert sorted(losses(ds)) == [3, 4]
    assert_same_losses(losses(ds), losses(native))
    back = tmp_path / "native-again"
    train_cli(1, back, corpus_dir, f"resume={ds / 'checkpoints/step_3'}")
    assert sorted(losses(back)) == [4]
    assert_same_losses(losses(back), losses(native))
    ours = load_file(export_checkpoint(ds / "checkpoints/step_4", tmp_path / "ds.safetensors"))
    theirs = load_file(export_checkpoint(native / "checkpoints/step_4", tmp_path / "native.safetensors"))
    assert ours.keys() == theirs.keys() and sum(".experts." in n for n in ours) == 9
    for name, t in ours.items():
        torch.testing.assert_close(t, theirs[name], rtol=1e-4, atol=1e-5, msg=name)
