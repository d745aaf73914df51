"""Progress bars (issue 15): drawn in place on a terminal, silent in a log file or under Slurm."""

from __future__ import annotations

import io
import os
import pty

from scifm.core.progress import Progress


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def run(stream, total: int = 5) -> float:
    progress = Progress("work", total, "docs", stream=stream, min_interval_s=0.0)
    for _ in range(total):
        progress()
    return progress.finish()


def test_a_terminal_gets_a_bar_redrawn_in_place(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    out = Terminal()
    assert run(out) >= 0
    draws = out.getvalue().split("\r")[1:]
    assert len(draws) == 6 and out.getvalue().count("\n") == 1  # one per item and the final one, one line
    assert "work [" in draws[0] and "1/5 docs" in draws[0] and "ETA" in draws[0]
    assert f"[{'#' * 24}] 5/5 docs" in draws[-1] and "done in" in draws[-1]


def test_a_pseudo_terminal_counts_as_a_terminal(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    main, side = pty.openpty()
    with os.fdopen(side, "w") as stream:
        run(stream, total=2)
    assert "2/2 docs" in read_all(main)
    os.close(main)


def read_all(main: int) -> str:
    """All a closed pseudo-terminal holds: one read may return before the last draw."""
    chunks = []
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # Linux: EIO once the other side is closed and drained
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode()


def test_a_log_file_or_a_slurm_job_gets_nothing(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    log = io.StringIO()
    run(log)
    assert log.getvalue() == ""
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    terminal = Terminal()  # srun --pty: a terminal, but the job's output is still a log
    run(terminal)
    assert terminal.getvalue() == ""
