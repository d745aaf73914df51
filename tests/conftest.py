"""Shared fixtures: a small built-in corpus and a tokenizer trained on it, built once per session.

The suite runs in two pytest-xdist workers, a test file per worker at a time (pyproject's addopts):
the machine's second core is otherwise idle while a single-process test runs. Session fixtures
that take minutes are built once for both workers (`once_per_session`).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

# one thread per xdist worker, for it and the processes it starts: two workers with torch's default of a
# thread per core oversubscribe the cores, and OpenMP threads that spin waiting for a descheduled peer
# made two concurrent 30-step training runs take 536 s against 68 s with one thread each (2 cores)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

# keep every cache a test run makes inside pytest's temp area, never in the user's home
os.environ.setdefault("SCIFM_CACHE", str(Path(os.environ.get("TMPDIR", "/tmp")) / "scifm-test-cache"))
# DeepSpeed compiles its CPU ops (shared-memory all-reduce, CPU Adam) once into torch's extension cache
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(os.environ["SCIFM_CACHE"]) / "torch_extensions"))

SMALL_CORPUS_DOCS = 150  # per source


def pytest_configure(config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)  # torch may be imported before OMP_NUM_THREADS was set


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `gpu` run where torch sees a CUDA device and are skipped, with the reason, elsewhere."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; torch sees none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """Built once per session; SCIFM_TEST_CORPUS names one built beforehand (bench/gpu.sh carries one
    to a GPU machine that lacks the packages the corpus is built from)."""
    if os.environ.get("SCIFM_TEST_CORPUS"):
        return Path(os.environ["SCIFM_TEST_CORPUS"])
    from scifm.data.corpus import build_corpus

    return once_per_session(tmp_path_factory, "corpus", lambda out: build_corpus(out, max_docs_per_source=SMALL_CORPUS_DOCS))


def once_per_session(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """A directory `build` fills once per test session: the first xdist worker to ask builds it while
    the other waits on a lock, then both read it (a worker's temp root is inside the session's)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    out, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)  # a worker that failed half way
            out.mkdir()
            build(out)
            done.touch()
    return out


@pytest.fixture(scope="session")
def make_config(corpus_dir):
    """compose_run_config with the small corpus and any extra overrides."""
    from scifm.config import compose_run_config

    def make(*overrides: str):
        return compose_run_config(
            ["experiment=tiny", f"data.corpus_dir={corpus_dir}",
             f"data.corpus_max_docs_per_source={SMALL_CORPUS_DOCS}", *overrides]
        )

    return make


@pytest.fixture(scope="session")
def tokenizer(make_config):
    from scifm.data.streams import resolve_sources
    from scifm.data.tokenizer_training import train_tokenizer

    cfg = make_config()
    return train_tokenizer(resolve_sources(cfg.data), cfg.data)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> tuple[Path, dict]:
    """`scifm train experiment=tiny` as the quickstart runs it (400 steps on the whole built-in
    corpus), trained once for every test that needs the demo model: (run directory, summary)."""
    from scifm.config import compose_run_config
    from scifm.train.trainer import train

    def build(out: Path) -> None:  # what train returned, kept outside the run directory
        summary = train(compose_run_config(["experiment=tiny"]), out)
        out.with_name("demo-summary.json").write_text(json.dumps(summary))

    run_dir = once_per_session(tmp_path_factory, "demo", build)
    return run_dir, json.loads(run_dir.with_name("demo-summary.json").read_text())
