"""End-to-end training: learning, run-directory contract, exact resume, atomic checkpoints, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scifm.core.errors import CheckpointError, ConfigError
from scifm.model.init import init_parameters
from scifm.model.multimodal import ScientificMoE, vocab_sizes_of
from scifm.core.checkpoint_files import latest_checkpoint
from scifm.train.trainer import train
from tests.helpers.run_metrics import losses


@pytest.mark.slow
def test_the_demo_run_beats_the_unigram_model_by_40_percent(demo_run):
    _, summary = demo_run
    assert summary["final_val_loss"] <= 0.6 * summary["unigram_val_loss"], summary


@pytest.mark.slow
def test_run_directory_holds_metrics_summary_and_checkpoints(demo_run):
    run_dir, summary = demo_run  # experiment=tiny: 400 steps, logs every 10, validates every 50, saves every 100
    for key in ("final_val_loss", "unigram_val_loss", "total_params", "active_params", "steps", "wall_seconds"):
        assert key in summary
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(10, 401, 10))
    assert all({"loss", "aux_loss", "tokens_per_s"} <= r.keys() for r in records)
    assert "val_loss" in records[4] and "val_loss" in records[-1] and "val_loss" not in records[0]
    assert records[-1]["val_loss"] == summary["final_val_loss"]
    assert len(records[0]["moe"]) == 3 and len(records[0]["moe"][0]["tokens_per_expert"]) == 8
    assert summary["active_params"] < summary["total_params"]
    assert set(summary["tokens_by_source"]) and sum(summary["tokens_by_skill"].values()) == summary["tokens_seen"]
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    assert ckpt.name == "step_400" and (run_dir / "checkpoints" / "step_100" / "meta.json").is_file()
    for name in ("model/model.safetensors.index.json", "optimizer/model.safetensors.index.json", "train_state.pt",
                 "loader.json", "config.yaml", "skipped.json",
                 "tokenizer/tokenizer.json"):
        assert (ckpt / name).is_file(), name


def test_resume_from_a_checkpoint_repeats_the_uninterrupted_losses(make_config, tmp_path):
    common = ("trainer.max_steps=6", "trainer.log_every=1", "trainer.val_every=100", "trainer.ckpt_every=3",
              "trainer.batch_size=4", "trainer.grad_accum=2", "data.seq_len=128", "data.val_batches=1")
    full = tmp_path / "full"
    train(make_config(*common), full)
    resumed = tmp_path / "resumed"
    train(make_config(*common, f"resume={full / 'checkpoints' / 'step_3'}"), resumed)
    want, got = losses(full), losses(resumed)
    assert sorted(got) == [4, 5, 6]
    assert all(got[s] == want[s] for s in got), (want, got)  # bit-exact on CPU in fp32
    a = torch.load(full / "checkpoints/step_6/train_state.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints/step_6/train_state.pt", weights_only=True)
    assert torch.equal(a["unigram_counts"], b["unigram_counts"])


def test_resume_latest_picks_the_newest_complete_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for step, complete in ((3, True), (6, True), (9, False)):
        d = root / f"step_{step}"
        d.mkdir(parents=True)
        if complete:
            (d / "meta.json").write_text(json.dumps({"step": step, "files": {}}))
    (root / ".step_12.tmp-99").mkdir()  # a save that was killed half way
    assert latest_checkpoint(root).name == "step_6"


def test_missing_or_foreign_checkpoint_is_a_clear_error(make_config, tmp_path):
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        train(make_config("resume=latest"), tmp_path / "empty")
    with pytest.raises(CheckpointError, match="not a complete scifm checkpoint"):
        train(make_config(f"resume={tmp_path}"), tmp_path / "x")


@pytest.mark.slow
def test_export_is_one_safetensors_file_of_the_trained_weights(demo_run, tmp_path):
    from safetensors.torch import load_file

    from scifm.train.export import export_checkpoint, load_checkpoint_model

    run_dir, _ = demo_run
    ckpt = run_dir / "checkpoints" / "step_400"
    weights = load_file(export_checkpoint(ckpt, tmp_path / "model.safetensors"))
    # one process wrote whole tensors: read them straight from its file, past the DCP loader
    (written,) = (ckpt / "model").glob("*.safetensors")
    raw = load_file(written)
    assert weights.keys() == raw.keys() and len(weights) > 300
    assert all(torch.equal(weights[k], raw[k]) for k in raw)
    _, run_tokenizer, cfg = load_checkpoint_model(ckpt)
    assert cfg.trainer.max_steps == 400
    fresh = ScientificMoE(cfg.model, vocab_sizes_of(run_tokenizer))
    init_parameters(fresh, cfg.trainer.seed, cfg.model.init_std, cfg.model.n_layers)
    init = fresh.state_dict()  # the same shapes as the run's initial weights, which training changed
    assert init.keys() == weights.keys()
    assert not torch.equal(weights["layers.1.attention.wq.weight"], init["layers.1.attention.wq.weight"])
    with pytest.raises(CheckpointError, match="not a complete scifm checkpoint"):
        export_checkpoint(tmp_path, tmp_path / "x.safetensors")


def test_bad_values_fail_at_start_up_naming_the_key(make_config, tmp_path):
    with pytest.raises(ConfigError, match=r"trainer\.precision"):
        train(make_config("trainer.precision=fp16"), tmp_path)
    with pytest.raises(ConfigError, match=r"model\.n_kv_heads"):
        train(make_config("model.n_kv_heads=3"), tmp_path)


def run_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "scifm.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_rejects_unknown_key_and_bad_type_with_the_key_path(tmp_path):
    out = run_cli("train", "trainer.bogus=1", cwd=tmp_path)
    assert out.returncode != 0 and "trainer.bogus" in out.stderr
    out = run_cli("train", "trainer.max_steps=many", cwd=tmp_path)
    assert out.returncode != 0 and "trainer.max_steps" in out.stderr
    out = run_cli("train", "model.moe.score_func=relu", "data.corpus_dir=/nonexistent-not-built", cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith("scifm: error: model.moe.score_func")


def test_cli_params_reports_the_paper_scale_counts(tmp_path):
    out = run_cli("params", "model=paper_1t", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "total" in out.stdout and "active" in out.stdout and " B)" in out.stdout


@pytest.mark.slow
def test_cli_train_writes_the_run_directory(corpus_dir, tmp_path):
    run_dir = tmp_path / "cli_run"
    out = run_cli("train", "experiment=tiny", f"data.corpus_dir={corpus_dir}", "data.corpus_max_docs_per_source=150",
                  "trainer.max_steps=4", "trainer.log_every=2", "trainer.val_every=4", "data.val_batches=1",
                  f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "step 4/4" in out.stderr and "final validation loss" in out.stdout
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4
    assert (run_dir / ".hydra" / "config.yaml").is_file()


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_ones(corpus_dir, tmp_path):
    """parallel.compile=true compiles each block (MoE routing included, attention over blocks of 48
    of the 128 queries, no graph-break fallback)."""
    common = ("experiment=tiny", f"data.corpus_dir={corpus_dir}", "data.corpus_max_docs_per_source=150",
              "trainer.max_steps=2", "trainer.log_every=1", "trainer.val_every=100", "data.val_batches=1",
              "trainer.batch_size=4", "data.seq_len=128", "model.attention_query_block=48")
    for name, extra in (("eager", ()), ("compiled", ("parallel.compile=true",))):
        out = run_cli("train", *common, *extra, f"hydra.run.dir={tmp_path / name}", cwd=tmp_path,
                      env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "TMPDIR": str(tmp_path)})
        assert out.returncode == 0, out.stderr[-3000:]
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert all(abs(compiled[s] - eager[s]) <= 1e-5 * abs(eager[s]) for s in eager), (eager, compiled)


def test_tied_embeddings_are_saved_once_and_tied_again_on_resume_and_export(make_config, tmp_path):
    """tie_embeddings: one tensor under two names, which safetensors refuses to write twice."""
    from scifm.train.export import load_checkpoint_model

    common = ("model.tie_embeddings=true", "trainer.max_steps=3", "trainer.log_every=1", "trainer.val_every=100",
              "trainer.ckpt_every=2", "data.val_batches=1", "trainer.batch_size=4", "data.seq_len=64")
    train(make_config(*common), tmp_path / "full")
    train(make_config(*common, f"resume={tmp_path / 'full/checkpoints/step_2'}"), tmp_path / "resumed")
    assert losses(tmp_path / "resumed")[3] == losses(tmp_path / "full")[3]  # bit-exact on CPU in fp32
    model, _, _ = load_checkpoint_model(tmp_path / "full/checkpoints/step_3")
    assert model.output.weight is model.tok_embeddings.weight
