"""What people look at (issue 15): TensorBoard event files hold metrics.jsonl's values, read back with
TensorBoard's own reader, and a resumed run continues the curves without duplicates; a W&B offline
run holds them too, without a network; plots/ holds the loss curves and the expert-load heatmap."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from scifm.config import TrainerConfig, WandbConfig
from scifm.core.errors import ConfigError
from scifm.train.dashboards import TENSORBOARD_DIR, Dashboards, scalars_of
from scifm.train.plots import expert_load_matrix, write_plots
from scifm.train.trainer import train


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def f32(x: float) -> float:
    return float(np.float32(x))  # TensorBoard stores scalars as float32


@pytest.fixture(scope="module")
def resumed_run(make_config, tmp_path_factory) -> Path:
    """4 steps with a checkpoint at step 2, then the same run directory resumed from step_2 (as after a
    kill past step 4's log): two TensorBoard sessions, the second training steps 3 and 4 again."""
    run_dir = tmp_path_factory.mktemp("dashboards")
    common = ("trainer.max_steps=4", "trainer.log_every=1", "trainer.val_every=2", "trainer.ckpt_every=2",
              "trainer.batch_size=4", "data.seq_len=128", "data.val_batches=1")
    train(make_config(*common), run_dir)
    train(make_config(*common, f"resume={run_dir / 'checkpoints' / 'step_2'}"), run_dir)
    return run_dir


def test_event_files_hold_the_values_of_metrics_jsonl(resumed_run):
    acc = EventAccumulator(str(resumed_run / TENSORBOARD_DIR), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    recs = records(resumed_run)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    expected: dict[str, dict[int, float]] = {}  # tag -> step -> value, from metrics.jsonl alone
    for r in recs:
        series = {f"train/{k}": r[k] for k in ("loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen")}
        for i, layer in enumerate(r["moe"]):
            loads = layer["tokens_per_expert"]
            series[f"moe/layer{i}/dropped_tokens"] = layer["dropped_tokens"]
            series[f"moe/layer{i}/load_imbalance"] = max(loads) / (sum(loads) / len(loads))
        if "val_loss" in r:
            series["val/loss"] = r["val_loss"]
            for group in ("source", "skill"):
                series |= {f"val/loss_by_{group}/{k}": v for k, v in r[f"val_loss_by_{group}"].items()}
                series |= {f"data/tokens_by_{group}/{k}": v for k, v in r[f"tokens_by_{group}"].items()}
        for tag, value in series.items():
            expected.setdefault(tag, {})[r["step"]] = value
    for r in (r for r in recs if "val_loss" in r):  # the whole loss lies among its parts'
        for group in ("source", "skill"):
            parts = r[f"val_loss_by_{group}"].values()
            assert len(parts) > 1 and min(parts) <= r["val_loss"] <= max(parts), group
    assert set(acc.Tags()["scalars"]) == set(expected)
    for tag, want in expected.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        # each step once, in order, though the second session logged steps 3 and 4 again
        assert got == [(step, pytest.approx(f32(v), rel=1e-6)) for step, v in sorted(want.items())], tag
    for r in recs:
        for i, layer in enumerate(r["moe"]):
            [h] = [e.histogram_value for e in acc.Histograms(f"moe/layer{i}/tokens_per_expert") if e.step == r["step"]]
            loads = layer["tokens_per_expert"]
            assert (h.min, h.max, h.num, h.sum) == (min(loads), max(loads), len(loads), sum(loads))


def test_a_resumed_session_purges_the_steps_it_trains_again(resumed_run):
    first, second = sorted((resumed_run / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    starts = [e.step for e in EventFileLoader(str(second)).Load() if e.HasField("session_log")]
    assert starts == [3]  # the resumed session starts at step_2 + 1: TensorBoard drops the first one's 3 and 4
    logged = {e.step for e in EventFileLoader(str(first)).Load() if e.summary.value}
    assert logged == {1, 2, 3, 4}


def test_plots_hold_the_loss_curves_and_the_expert_load_heatmap(resumed_run):
    for name in ("loss.png", "expert_load.png"):
        with Image.open(resumed_run / "plots" / name) as image:
            image.load()
            assert image.format == "PNG" and image.width >= 600 and image.height >= 150, (name, image.size)
            assert len(np.unique(np.asarray(image.convert("L")))) > 20, name  # drawn on, not a blank canvas
    recs = records(resumed_run)
    steps, matrix = expert_load_matrix(recs)
    assert steps == [1, 2, 3, 4] and matrix.shape == (3, 4)  # the tiny model's 3 MoE layers x logged steps
    loads = np.array(recs[2]["moe"][1]["tokens_per_expert"])
    assert matrix[1, 2] == pytest.approx(loads.max() / loads.mean())
    assert np.all(matrix >= 1.0)  # the busiest expert has at least the mean load


def test_expert_load_matrix_is_layers_by_steps():
    recs = [{"step": s, "moe": [{"tokens_per_expert": [1, 1, 1, 1]}, {"tokens_per_expert": [4, 0, 0, 0]}]}
            for s in (10, 20, 30)]
    recs[1]["moe"][0]["tokens_per_expert"] = [0, 0, 0, 0]  # a layer without tokens at a step has no value
    steps, matrix = expert_load_matrix(recs)
    assert steps == [10, 20, 30]
    np.testing.assert_array_equal(matrix, [[1.0, np.nan, 1.0], [4.0, 4.0, 4.0]])


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of a W&B run file: a header, then 32 KiB blocks of records (4-byte checksum,
    2-byte length, 1-byte type: full, or first, middle and last pieces), each a protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, piece, rows = 7, b"", []
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:  # a block's tail too short for a record header is padding
            pos += room
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        piece += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(piece)
            piece = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_a_wandb_offline_run_holds_the_metrics(resumed_run, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):  # nothing in the home directory
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the key decides
    tc = TrainerConfig(tensorboard=False, wandb=WandbConfig(mode="offline", tags=["test"]))
    dashboards = Dashboards(tc, tmp_path, start_step=0, run_config={"trainer": {"max_steps": 4}})
    recs = records(resumed_run)
    for r in recs:
        dashboards.log(r)
    dashboards.close()
    [run_file] = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    rows = wandb_history(run_file)
    assert [row["_step"] for row in rows] == [1, 2, 3, 4]
    for row, r in zip(rows, recs):
        want = scalars_of(r)
        assert {k: row[k] for k in want} == pytest.approx(want, rel=1e-12)
        hist = row["moe/layer0/tokens_per_expert/values"]
        assert sum(hist) == len(r["moe"][0]["tokens_per_expert"])
    assert (tmp_path / "wandb" / "scifm-run-id").read_text().strip() == run_file.stem.removeprefix("run-")


@pytest.mark.parametrize("package, override, key, remedy", [
    ("wandb", "trainer.wandb.mode=offline", "trainer.wandb.mode", "'.[wandb]'"),
    ("tensorboard", "trainer.tensorboard=true", "trainer.tensorboard", "trainer.tensorboard=false")])
def test_a_dashboard_asked_for_but_not_installed_is_one_line_naming_the_remedy(package, override, key, remedy,
                                                                               make_config, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # what an environment without it finds
    with pytest.raises(ConfigError) as info:
        train(make_config(override), tmp_path / "run")
    assert str(info.value).startswith(f"{key}: ") and remedy in str(info.value)
    assert "\n" not in str(info.value) and not (tmp_path / "run").exists()  # before any work


def test_without_matplotlib_a_finished_run_says_its_plots_are_missing_in_one_line(resumed_run, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert write_plots(resumed_run) == []
    assert capsys.readouterr().err == "plots/ not written: matplotlib is not installed (pip install matplotlib)\n"
