"""Every config error is one line naming the key, printed once, exit status 2 (issue 10, defect 7).

Range checks: each numeric field that would crash (ZeroDivisionError, a torch or NumPy error) or
silently misbehave at 0 or a negative value is rejected by validate(), naming its key. Hydra's own
errors (an unknown key, a wrong type, a typo inside a list entry) name the full key path. The
command line and torchrun print a config error once, as one `scifm: error:` line, with status 2.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scifm.config import compose_run_config
from scifm.core.errors import ConfigError
from scifm.eval.config import compose_eval_config
from scifm.model.config import ModelConfig, MoEConfig
from scifm.parallel.dims import ParallelDims

ENCODERS = ("latex", "molecule", "protein", "table", "figure")

# (override, the key the error must name)
BAD_VALUES = [
    ("model.moe.n_groups=0", "model.moe.n_groups"),
    ("model.moe.n_groups=-2", "model.moe.n_groups"),
    *((f"model.encoders.{name}.heads=0", f"model.encoders.{name}.heads") for name in ENCODERS),
    *((f"model.encoders.{name}.width=0", f"model.encoders.{name}.width") for name in ENCODERS),
    *((f"model.encoders.{name}.layers=-1", f"model.encoders.{name}.layers") for name in ENCODERS),
    *((f"model.encoders.{name}.max_len=0", f"model.encoders.{name}.max_len") for name in ENCODERS),
    *((f"model.encoders.{name}.slots=0", f"model.encoders.{name}.slots") for name in ENCODERS),
    ("model.encoders.figure.patch_size=0", "model.encoders.figure.patch_size"),
    ("model.encoders.figure.max_side=0", "model.encoders.figure.max_side"),
    ("model.encoders.figure.max_side=4", "model.encoders.figure.max_side"),  # below patch_size=8
    ("model.vocab_size=-1", "model.vocab_size"),
    ("model.d_model=0", "model.d_model"),
    ("model.n_layers=0", "model.n_layers"),
    ("model.n_heads=0", "model.n_heads"),
    ("model.n_kv_heads=0", "model.n_kv_heads"),
    ("model.head_dim=-2", "model.head_dim"),
    ("model.ffn_hidden=0", "model.ffn_hidden"),
    ("model.n_dense_layers=-1", "model.n_dense_layers"),
    ("model.rope_theta=0", "model.rope_theta"),
    ("model.norm_eps=0", "model.norm_eps"),
    ("model.max_seq_len=0", "model.max_seq_len"),
    ("model.init_std=0", "model.init_std"),
    ("model.moe.n_experts=0", "model.moe.n_experts"),
    ("model.moe.top_k=0", "model.moe.top_k"),
    ("model.moe.topk_groups=0", "model.moe.topk_groups"),
    ("model.moe.expert_ffn=0", "model.moe.expert_ffn"),
    ("model.moe.n_shared_experts=-1", "model.moe.n_shared_experts"),
    ("model.moe.route_scale=0", "model.moe.route_scale"),
    ("model.moe.aux_loss_coef=-0.1", "model.moe.aux_loss_coef"),
    ("model.moe.z_loss_coef=-0.1", "model.moe.z_loss_coef"),
    ("model.moe.bias_update_rate=-0.1", "model.moe.bias_update_rate"),
    ("model.moe.capacity_factor=-1", "model.moe.capacity_factor"),
    ("data.sources=[{path:builtin,weight:0}]", "data.sources[0].weight"),
    ("data.seq_len=0", "data.seq_len"),
    ("data.temperature=0", "data.temperature"),
    ("data.max_bad_fraction=-0.1", "data.max_bad_fraction"),
    ("data.corpus_max_docs_per_source=-1", "data.corpus_max_docs_per_source"),
    ("data.tokenizer_vocab_size=0", "data.tokenizer_vocab_size"),
    ("data.tokenizer_train_docs=0", "data.tokenizer_train_docs"),
    ("data.val_batches=0", "data.val_batches"),
    ("data.prefetch_batches=-1", "data.prefetch_batches"),
    ("trainer.seed=-1", "trainer.seed"),
    ("trainer.max_steps=-1", "trainer.max_steps"),
    ("trainer.batch_size=0", "trainer.batch_size"),
    ("trainer.grad_accum=0", "trainer.grad_accum"),
    ("trainer.lr=0", "trainer.lr"),
    ("trainer.min_lr_ratio=-0.5", "trainer.min_lr_ratio"),
    ("trainer.warmup_steps=-1", "trainer.warmup_steps"),
    ("trainer.weight_decay=-0.1", "trainer.weight_decay"),
    ("trainer.beta1=1", "trainer.beta1"),
    ("trainer.beta2=-0.1", "trainer.beta2"),
    ("trainer.grad_clip=-1", "trainer.grad_clip"),
    ("trainer.log_every=0", "trainer.log_every"),
    ("trainer.val_every=0", "trainer.val_every"),
    ("trainer.ckpt_every=-1", "trainer.ckpt_every"),
    ("trainer.wandb.mode=cloud", "trainer.wandb.mode"),
    ("trainer.wandb.project=''", "trainer.wandb.project"),
    ("trainer.profile.start_step=-1", "trainer.profile.start_step"),
    ("trainer.profile.steps=0", "trainer.profile.steps"),
    *((f"parallel.{key}=0", f"parallel.{key}") for key in ("dp_replicate", "dp_shard", "tp", "pp", "ep",
                                                           "pp_virtual_stages")),
    ("parallel.pp_split=[4,0]", "parallel.pp_split"),
    ("cluster.nodes=0", "cluster.nodes"),
    ("cluster.cpus_per_task=0", "cluster.cpus_per_task"),
    ("cluster.gpus_per_node=-1", "cluster.gpus_per_node"),
    ("cluster.signal_seconds=-1", "cluster.signal_seconds"),
    ("cluster.max_restarts=-1", "cluster.max_restarts"),
]


def one_line_naming(err: BaseException, key: str) -> bool:
    text = str(err)
    return text.startswith(f"{key}: ") and "\n" not in text


@pytest.mark.parametrize("override, key", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_bad_value_is_a_config_error_naming_the_key(override, key):
    extra = ["parallel.pp=2"] if key == "parallel.pp_split" else []
    cfg = compose_run_config(["experiment=tiny", *extra, override])
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert one_line_naming(info.value, key), str(info.value)


def test_batch_size_must_split_over_the_data_parallel_ranks():
    """Found by the loader only after the corpus and the tokenizer were built; now at start-up."""
    cfg = compose_run_config(["experiment=tiny", "parallel.dp_shard=2", "trainer.batch_size=3"])
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert one_line_naming(info.value, "trainer.batch_size"), str(info.value)


@pytest.mark.parametrize("override, key", [
    ("eval.max_items=-1", "eval.max_items"),
    ("eval.batch_size=0", "eval.batch_size"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens"),
])
def test_bad_eval_value_is_a_config_error_naming_the_key(override, key):
    cfg = compose_eval_config(["checkpoint=/nowhere", "eval.tasks=[x]", override])
    with pytest.raises(ConfigError) as info:
        cfg.eval.validate()
    assert one_line_naming(info.value, key), str(info.value)


# ---- Hydra's errors: one line naming the full key path ----

@pytest.mark.parametrize("override, key", [
    ("trainer.nope=1", "trainer.nope"),
    ("+trainer.nope=1", "trainer.nope"),  # Hydra accepted an appended key silently
    ("nope=1", "nope"),
    ("trainer.lr=abc", "trainer.lr"),
    ("trainer.max_steps=many", "trainer.max_steps"),
    ("model.moe=3", "model.moe"),
    ("model.encoders.latex={width:64,nope:1}", "model.encoders.latex.nope"),
    ("data.sources=[{path:/x,wieght:2}]", "data.sources[0].wieght"),
    ("data.sources=[{path:/x},{path:/y,wieght:2}]", "data.sources[1].wieght"),
    ("data.sources=[{path:/x,weight:abc}]", "data.sources[0].weight"),
    ("data.sources=[3]", "data.sources[0]"),
    ("experiment=nope", "experiment"),
    ("trainer.lr=1e-3,1e-2", "trainer.lr"),  # a sweep without -m
    ("trainer.lr='a", "trainer.lr"),  # an override Hydra cannot parse
])
def test_hydra_errors_name_the_full_key_path(override, key):
    with pytest.raises(ConfigError) as info:
        compose_run_config(["experiment=tiny", override])
    assert one_line_naming(info.value, key), str(info.value)


def test_new_keys_of_dict_fields_are_still_welcome():
    cfg = compose_run_config(["+cluster.env.NCCL_DEBUG=INFO", "+hydra.job.env_set.X=1"])
    assert cfg.cluster.env == {"NCCL_DEBUG": "INFO"}


def test_an_unknown_key_names_the_schema_and_no_append_hint():
    with pytest.raises(ConfigError) as info:
        compose_run_config(["data.sources=[{path:/x,wieght:2}]"])
    assert "SourceConfig" in str(info.value) and "+data" not in str(info.value)


# ---- expert parallelism: every message says where ep's ranks come from ----

TINY = ModelConfig(n_heads=4, n_kv_heads=2, ffn_hidden=384, n_layers=4, moe=MoEConfig(n_experts=8))


@pytest.mark.parametrize("model, dims, world", [
    (TINY, ParallelDims(ep=2), 2),  # ep taken for extra processes: dp_shard x tp = 1
    (TINY, ParallelDims(ep=2), 1),
    (TINY, ParallelDims(dp_shard=2, ep=4), 4),
    (TINY, ParallelDims(dp_shard=2, ep=2), 4),  # fits, but the world is not the layout's
    (TINY, ParallelDims(dp_shard=3, ep=3), 3),
    (ModelConfig(n_layers=2, n_dense_layers=2), ParallelDims(dp_shard=2, ep=2), 2),
])
def test_every_ep_message_says_ep_borrows_from_dp_shard_and_tp(model, dims, world):
    with pytest.raises(ConfigError) as info:
        dims.validate(model, world)
    text = str(info.value)
    assert "\n" not in text and "borrows" in text and "dp_shard x tp" in text and "parallel.ep" in text, text


def test_ep_on_too_few_borrowed_ranks_says_what_to_raise():
    with pytest.raises(ConfigError) as info:
        ParallelDims(ep=2).validate(TINY, 2)
    text = str(info.value)
    assert text.startswith("parallel.ep: ") and "dp_shard x tp = 1" in text, text
    assert "parallel.dp_shard" in text and "parallel.tp" in text, text


def test_an_explicit_vocabulary_must_split_over_tp():
    with pytest.raises(ConfigError) as info:
        ParallelDims(tp=2).validate(ModelConfig(vocab_size=1001), 2)
    assert one_line_naming(info.value, "parallel.tp") and "model.vocab_size=1001" in str(info.value)


# ---- the command line and torchrun ----

def run_train(*args: str, cwd: Path, launcher: tuple[str, ...] = ("-m", "scifm.cli", "train"),
              timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, SCIFM_CACHE=str(cwd / "cache"), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *launcher, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_error_line(out: subprocess.CompletedProcess, key: str) -> None:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, (out.returncode, out.stderr[-3000:])
    assert lines[0].startswith(f"scifm: error: {key}: "), lines


def test_cli_train_zero_groups_fails_fast_with_one_line(tmp_path):
    out = run_train("experiment=tiny", "model.moe.n_groups=0", f"data.corpus_dir={tmp_path / 'corpus'}",
                    f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert_one_error_line(out, "model.moe.n_groups")
    assert not (tmp_path / "corpus").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("override, key", [
    ("trainer.nope=1", "trainer.nope"),
    ("trainer.lr=abc", "trainer.lr"),
    ("data.sources=[{path:/x,wieght:2}]", "data.sources[0].wieght"),
])
def test_cli_train_hydra_errors_are_one_line_with_status_2(tmp_path, override, key):
    out = run_train("experiment=tiny", override, cwd=tmp_path)
    assert_one_error_line(out, key)


def test_cli_train_multirun_checks_every_point_before_the_first_job(tmp_path):
    out = run_train("-m", "experiment=tiny", "trainer.lr=1e-3,abc", f"data.corpus_dir={tmp_path / 'corpus'}",
                    f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert_one_error_line(out, "trainer.lr")
    assert not (tmp_path / "sweep").exists()


def test_cli_train_still_hands_hydra_its_own_flags(tmp_path):
    out = run_train("experiment=tiny", "trainer.max_steps=7", "--cfg", "job", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"max_steps: 7\b", out.stdout), out.stdout[-2000:]


@pytest.mark.parametrize("override, key", [
    ("parallel.tp=3", "parallel"),  # the layout, checked against the world of 2
    ("trainer.nope=1", "trainer.nope"),
])
def test_torchrun_prints_a_config_error_once(tmp_path, override, key):
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "scifm.train")
    out = run_train("experiment=tiny", override, f"data.corpus_dir={tmp_path / 'corpus'}",
                    f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, launcher=torchrun)
    combined = out.stdout + out.stderr
    assert out.returncode != 0
    assert combined.count("scifm: error:") == 1, combined[-4000:]
    assert f"scifm: error: {key}: " in combined, combined[-4000:]
    assert not (tmp_path / "corpus").exists()
