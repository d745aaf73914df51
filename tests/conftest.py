"""Shared fixtures: a small built-in corpus and a tokenizer trained on it, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# keep every cache a test run makes inside pytest's temp area, never in the user's home
os.environ.setdefault("SCIFM_CACHE", str(Path(os.environ.get("TMPDIR", "/tmp")) / "scifm-test-cache"))
# DeepSpeed compiles its CPU ops (shared-memory all-reduce, CPU Adam) once into torch's extension cache
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(os.environ["SCIFM_CACHE"]) / "torch_extensions"))

SMALL_CORPUS_DOCS = 150  # per source


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

    out = tmp_path_factory.mktemp("corpus")
    build_corpus(out, max_docs_per_source=SMALL_CORPUS_DOCS)
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
    """`scifm train experiment=tiny` as the quickstart runs it (200 steps on the whole built-in
    corpus), trained once for every test that needs the demo model: (run directory, summary)."""
    from scifm.config import compose_run_config
    from scifm.train.trainer import train

    run_dir = tmp_path_factory.mktemp("demo")
    return run_dir, train(compose_run_config(["experiment=tiny"]), run_dir)
