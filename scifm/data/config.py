"""Typed data configuration (data.*): the corpus sources, their mixture, packing and the tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field

from scifm.core.checks import require


SOURCE_KINDS = ("jsonl", "indexed")


@dataclass
class SourceConfig:
    path: str = "builtin"  # "builtin" = the built-in corpus; else a .jsonl(.gz) file or a directory
    weight: float = 1.0
    name: str = ""  # defaults to the file or directory stem
    kind: str = "jsonl"  # "jsonl"; or "indexed": `path` is the --out prefix of `scifm data tokenize`


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    seq_len: int = 256
    temperature: float = 1.0  # source probabilities ~ weight ** (1 / temperature)
    balance_skills: bool = False  # sample skills within a source uniformly instead of by count
    max_bad_fraction: float = 0.05
    corpus_dir: str = ""  # where the built-in corpus is built; "" = $SCIFM_CACHE or ~/.cache/scifm
    corpus_max_docs_per_source: int = 0  # 0 = all
    tokenizer_vocab_size: int = 2048  # BPE text vocabulary
    tokenizer_train_docs: int = 20000  # documents of the train split the BPE is trained on
    val_batches: int = 4
    # training batches a worker process makes ahead of the step (scifm.data.prefetch); 0 = made on
    # the training thread when the step asks
    prefetch_batches: int = 4
    # threads computing a batch's items' features beside the one making the batch: worth it for
    # figures (decoding and resizing release the interpreter lock); 1 = that thread alone
    featurize_threads: int = 1

    def validate(self) -> None:
        require(len(self.sources) > 0, "data.sources", "list at least one source")
        for i, src in enumerate(self.sources):
            require(src.weight > 0, f"data.sources[{i}].weight", f"must be > 0, got {src.weight}")
            require(src.kind in SOURCE_KINDS, f"data.sources[{i}].kind",
                    f"must be one of {', '.join(SOURCE_KINDS)}, got {src.kind!r}")
            require(src.kind == "jsonl" or src.path != "builtin", f"data.sources[{i}].path",
                    "an indexed source needs the prefix `scifm data tokenize --out` was given")
        require(self.seq_len >= 16, "data.seq_len", f"must be >= 16, got {self.seq_len}")
        require(self.temperature > 0, "data.temperature", "must be > 0")
        require(0 <= self.max_bad_fraction <= 1, "data.max_bad_fraction", "must be in [0, 1]")
        require(self.corpus_max_docs_per_source >= 0, "data.corpus_max_docs_per_source",
                f"must be >= 0 (0 = all), got {self.corpus_max_docs_per_source}")
        require(self.tokenizer_vocab_size >= 300, "data.tokenizer_vocab_size",
                 "must be >= 300 (256 byte symbols plus merges)")
        # 0 documents would train the BPE on no text at all
        require(self.tokenizer_train_docs >= 1, "data.tokenizer_train_docs",
                f"must be >= 1, got {self.tokenizer_train_docs}")
        require(self.val_batches >= 1, "data.val_batches", "must be >= 1")
        require(self.prefetch_batches >= 0, "data.prefetch_batches",
                f"must be >= 0 (0 = no worker), got {self.prefetch_batches}")
        require(self.featurize_threads >= 1, "data.featurize_threads",
                f"must be >= 1 (1 = no threads beside the loader's), got {self.featurize_threads}")
