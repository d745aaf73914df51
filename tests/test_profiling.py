"""trainer.profile: the window of steps it names, and only those, is in every rank's trace."""

from __future__ import annotations

import json

from scifm.train.profiling import PROFILE_DIR, step_marker
from scifm.train.trainer import train


def test_the_profiled_steps_and_only_they_are_in_the_trace(make_config, tmp_path):
    cfg = make_config("trainer.max_steps=4", "trainer.val_every=100", "trainer.ckpt_every=0", "trainer.batch_size=2",
                      "data.seq_len=64", "data.val_batches=1", "trainer.tensorboard=false",
                      "trainer.profile.start_step=2", "trainer.profile.steps=2")
    train(cfg, tmp_path)
    trace = json.loads((tmp_path / PROFILE_DIR / "rank0.json").read_text())
    names = {event["name"] for event in trace["traceEvents"] if event.get("ph") == "X"}
    assert {step_marker(s) for s in (1, 2, 3, 4)} & names == {step_marker(2), step_marker(3)}
    assert "aten::mm" in names  # the model's work inside the window, not just the markers
    assert "aten::mm" in (tmp_path / PROFILE_DIR / "ops.txt").read_text()


def test_off_by_default_writes_no_profile(make_config, tmp_path):
    cfg = make_config("trainer.max_steps=1", "trainer.val_every=100", "trainer.ckpt_every=0", "trainer.batch_size=2",
                      "data.seq_len=64", "data.val_batches=1", "trainer.tensorboard=false")
    train(cfg, tmp_path)
    assert not (tmp_path / PROFILE_DIR).exists()
