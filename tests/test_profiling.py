"""trainer.profile: the window of steps it names, and only those, is in every rank's trace."""

from __future__ import annotations

import json

from scifm.train.profiling import PROFILE_DIR, step_marker
from scifm.train.trainer import train

SMALL = ("trainer.val_every=100", "trainer.ckpt_every=0", "trainer.batch_size=2", "data.seq_len=64",
         "data.val_batches=1", "trainer.tensorboard=false")


def test_the_window_is_traced_but_the_step_that_measures_memory_with_the_profiler(make_config, tmp_path, capsys):
    """On a CPU step 1 measures memory.json's peak with torch's profiler; a second session at once
    crashed the process (a segfault), so the window [1, 3] traces steps 2 and 3 and says so."""
    train(make_config("trainer.max_steps=4", *SMALL, "trainer.profile.start_step=1", "trainer.profile.steps=3"),
          tmp_path)
    trace = json.loads((tmp_path / PROFILE_DIR / "rank0.json").read_text())
    names = {event["name"] for event in trace["traceEvents"] if event.get("ph") == "X"}
    assert {step_marker(s) for s in (1, 2, 3, 4)} & names == {step_marker(2), step_marker(3)}
    assert "aten::mm" in names  # the model's work inside the window, not just the markers
    assert "aten::mm" in (tmp_path / PROFILE_DIR / "ops.txt").read_text()
    assert "trainer.profile: step 1 measures memory.json" in capsys.readouterr().out
    assert json.loads((tmp_path / "memory.json").read_text())["rank0"]["step_peak_bytes"] > 0  # still measured


def test_off_by_default_writes_no_profile(make_config, tmp_path):
    train(make_config("trainer.max_steps=1", *SMALL), tmp_path)
    assert not (tmp_path / PROFILE_DIR).exists()
