"""Indexed datasets (issue 13): `scifm data tokenize` writes Megatron-Core .bin/.idx shards that
Megatron itself reads back as scifm's ids, tables and figures beside them; `data.sources` of kind
indexed give the loader the batches the JSONL files give, resume exactly, and refuse a foreign
tokenizer; bad input is counted."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import shutil
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from rdkit import Chem

pytest.importorskip("megatron.core")

from scifm.cli import main  # noqa: E402
from scifm.core.errors import DataError, DocumentFormatError  # noqa: E402
from scifm.data import loader as loader_module  # noqa: E402
from scifm.data import lookahead  # noqa: E402
from scifm.data.encode import EncodedDocument, encode_document  # noqa: E402
from scifm.data.documents import jsonl_files, parse_line, read_lines, split_of  # noqa: E402
from scifm.data.features import featurize_segment  # noqa: E402
from scifm.data.features import table as table_module  # noqa: E402
from scifm.data.features.molecule import featurize_molecule  # noqa: E402
from scifm.data.indexed import layout  # noqa: E402
from scifm.data.indexed import payloads as payloads_module  # noqa: E402
from scifm.data.indexed.graphs import graph_size, unpacked_graph  # noqa: E402
from scifm.data.indexed.packing_index import REFUSED, index_row, laid_out_lengths  # noqa: E402
from scifm.data.indexed import stream as stream_module  # noqa: E402
from scifm.data.indexed.stream import OpenShard  # noqa: E402
from scifm.data.indexed.write import tokenize_corpus  # noqa: E402
from scifm.data.streams import resolve_sources  # noqa: E402
from scifm.tokenizers import ScientificTokenizer  # noqa: E402
from tests.test_data_pipeline import batches_equal, make_loader, text_doc, user_config  # noqa: E402

# how a loader draws: a batch's draws at once, with the indexed streams' documents taken from their
# blocks (scifm.data.lookahead), or one document at a time, as a batch under lookahead.MIN_DRAWS does
EVERY_BATCH, ONE_AT_A_TIME = 0, 10**9


@contextlib.contextmanager
def drawing(min_draws: int):
    saved, lookahead.MIN_DRAWS = lookahead.MIN_DRAWS, min_draws
    try:
        yield
    finally:
        lookahead.MIN_DRAWS = saved


def next_batch(loader, min_draws: int):
    with drawing(min_draws):
        return loader.next_batch()


# built-in sources whose documents are text, molecules, proteins and LaTeX only
CHEM_FILES = ("chembl-fraggle.jsonl", "pyhmmer-proteome.jsonl")
LATEX_FILE = "sympy-latex-pairs.jsonl"
DOCS_PER_SHARD = 40
# modality -> (domain vocabulary, segment field), as the stored layout is specified
DOMAIN = {"molecule": ("smiles", "smiles"), "protein": ("protein", "sequence"), "latex": ("latex", "latex")}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, tokenizer) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save(out)
    return out


@pytest.fixture(scope="session")
def token_corpus(tmp_path_factory, corpus_dir) -> Path:
    """Two JSONL sources: a directory 'chem' (molecules, proteins) and a file 'latex.jsonl'."""
    out = tmp_path_factory.mktemp("token_corpus")
    (out / "chem").mkdir()
    for name in CHEM_FILES:
        shutil.copy(corpus_dir / name, out / "chem" / name)
    shutil.copy(corpus_dir / LATEX_FILE, out / "latex.jsonl")
    return out


@pytest.fixture(scope="session")
def indexed(tmp_path_factory, token_corpus, tokenizer_dir) -> Path:
    """The same two sources as indexed datasets: 'chem' in shards of DOCS_PER_SHARD, 'latex' in one."""
    out = tmp_path_factory.mktemp("indexed")
    tokenize_corpus([str(token_corpus / "chem")], tokenizer_dir, out / "chem", DOCS_PER_SHARD)
    tokenize_corpus([str(token_corpus / "latex.jsonl")], tokenizer_dir, out / "latex")
    return out


# built-in sources with tables and figures (files under the corpus's figures/), and documents made here
MEDIA_FILES = ("matplotlib-plots.jsonl", "skimage-images.jsonl", "statsmodels-tables.jsonl")


def made_media_docs() -> list[dict]:
    """What the built-in sources lack: figures given inline (0..1 grayscale, 0..255 RGBA), tables with
    captions, empty and long cells, and a document mixing a table, a figure and a molecule."""
    rng = np.random.default_rng(0)
    docs = []
    for i in range(24):
        array = (rng.random((5 + i, 9)).round(3).tolist() if i % 2 else
                 rng.integers(0, 256, (7, 4 + i, 4)).tolist())
        table = {"type": "table", "columns": ["name", "value", "note"],
                 "rows": [[f"row {r}", r * 1.5, None if r % 2 else "a long note of many words in one cell"]
                          for r in range(1 + i % 4)]}
        if i % 3:
            table["caption"] = f"Table {i}: measured values of sample {i}, with notes."
        segments = [{"type": "text", "text": f"Made document {i} shows"}, {"type": "figure", "array": array},
                    {"type": "text", "text": " and tabulates"}, table]
        if i % 4 == 0:
            segments.append({"type": "molecule", "smiles": "CC(=O)Oc1ccccc1C(=O)O"})
        docs.append({"id": f"made-{i}", "source": "made", "skill": "fig.made", "segments": segments})
    return docs


@pytest.fixture(scope="session")
def media_corpus(tmp_path_factory, corpus_dir) -> Path:
    """A JSONL directory of tables and figures: built-in files (their figures beside them) and made ones."""
    out = tmp_path_factory.mktemp("media_corpus")
    for name in MEDIA_FILES:
        shutil.copy(corpus_dir / name, out / name)
    shutil.copytree(corpus_dir / "figures", out / "figures")
    (out / "made.jsonl").write_text("".join(json.dumps(d) + "\n" for d in made_media_docs()))
    return out


@pytest.fixture(scope="session")
def media_indexed(tmp_path_factory, media_corpus, tokenizer_dir) -> Path:
    out = tmp_path_factory.mktemp("media_indexed")
    tokenize_corpus([str(media_corpus)], tokenizer_dir, out / "media", DOCS_PER_SHARD)
    return out


def media_config(make_config, path: Path, *extra: str, indexed: bool = False):
    return user_config(make_config, f"[{{path:{path},{'kind:indexed,' if indexed else ''}name:media}}]", *extra)


def jsonl_config(make_config, corpus: Path, *extra: str):
    return user_config(make_config, f"[{{path:{corpus / 'chem'},name:chem,weight:2.0}},"
                                    f"{{path:{corpus / 'latex.jsonl'},name:latex}}]", *extra)


def indexed_config(make_config, prefixes: Path, *extra: str):
    return user_config(make_config, f"[{{path:{prefixes / 'chem'},kind:indexed,name:chem,weight:2.0}},"
                                    f"{{path:{prefixes / 'latex'},kind:indexed,name:latex}}]", *extra)


def counting(calls: Counter, name: str, real):
    """`real`, counting its calls in calls[name]."""
    def wrapped(*args):
        calls[name] += 1
        return real(*args)
    return wrapped


def documents(path: Path) -> list:
    return [parse_line(raw) for f in jsonl_files(path) for _, raw in read_lines(f) if raw.strip()]


def expected_ids(doc, tok) -> list[int]:
    """[BOS], prose ids, [START_X] domain ids [END_X] per item, [EOS]."""
    ids = [tok.bos_id]
    for seg in doc.segments:
        kind = seg["type"]
        if kind == "text":
            ids += tok.encode_text(seg["text"])
        else:
            domain, key = DOMAIN[kind]
            ids += [tok.start_id(kind), *tok.encode_domain(domain, seg[key]), tok.end_id(kind)]
    return ids + [tok.eos_id]


# --- the files, read by Megatron ---------------------------------------------------------------

def test_megatron_reads_back_the_ids_scifm_gives_each_document(indexed, token_corpus, tokenizer):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = documents(token_corpus / "chem")
    sidecar = json.loads((indexed / "chem.json").read_text())
    assert sidecar["skipped"] == {} and sidecar["documents"] == len(docs)
    assert [s["documents"] for s in sidecar["shards"]] == [DOCS_PER_SHARD] * (len(docs) // DOCS_PER_SHARD) + \
        ([len(docs) % DOCS_PER_SHARD] if len(docs) % DOCS_PER_SHARD else [])
    stored = []
    for shard in sidecar["shards"]:
        ds = IndexedDataset(str(indexed / shard["name"]))
        assert ds.index.dtype == np.uint16  # Megatron's choice for a vocabulary under 65500
        assert list(ds.document_indices) == list(range(len(ds) + 1))  # one Megatron document per document
        stored += [ds[i].tolist() for i in range(len(ds))]
    assert stored == [expected_ids(d, tokenizer) for d in docs]
    assert sum(map(len, stored)) == sidecar["tokens"]
    want_skills = {split: Counter(d.skill for d in docs if split_of(d.id) == split) for split in sidecar["skills"]}
    assert {split: Counter(c) for split, c in sidecar["skills"].items()} == want_skills
    assert sidecar["tokenizer"] == {"fingerprint": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size}


def test_the_tokenizers_decoding_recovers_every_smiles_sequence_and_latex(indexed, token_corpus, tokenizer):
    """What the encoders are given comes from decoding the stored span: it must be the JSONL field."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    seen = Counter()
    for name, source in (("chem", token_corpus / "chem"), ("latex", token_corpus / "latex.jsonl")):
        sidecar = json.loads((indexed / f"{name}.json").read_text())
        stored = [ids.tolist() for s in sidecar["shards"] for ids in IndexedDataset(str(indexed / s["name"]))]
        for doc, ids in zip(documents(source), stored, strict=True):
            for seg in (s for s in doc.segments if s["type"] in DOMAIN):
                start = ids.index(tokenizer.start_id(seg["type"]))
                end = ids.index(tokenizer.end_id(seg["type"]), start)
                assert tokenizer.decode(ids[start + 1 : end]) == seg[DOMAIN[seg["type"]][1]]
                ids = ids[end + 1 :]
                seen[seg["type"]] += 1
    assert all(seen[kind] >= 50 for kind in DOMAIN), seen


def test_the_stored_graphs_are_the_featurizers_arrays_of_every_smiles(indexed, token_corpus):
    """The loader takes a molecule's graph from the dataset instead of parsing its SMILES: unpacked, it
    must be what the featurizer makes of the JSONL field, atom for atom and bond for bond."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    sidecar = json.loads((indexed / "chem.json").read_text())
    docs = iter(documents(token_corpus / "chem"))
    molecules = 0
    for shard in sidecar["shards"]:
        meta = IndexedDataset(str(indexed / f"{shard['name']}.docs"))
        # Megatron cannot map a shard's empty graphs file, and the reader does not open it
        graphs = IndexedDataset(str(indexed / f"{shard['name']}.graphs")) if shard["molecules"] else None
        for pos in range(len(meta)):
            doc_id, _, _, atoms, bonds = json.loads(meta[pos].tobytes())
            doc, block, done = next(docs), graphs[pos] if atoms else [], 0
            assert doc_id == doc.id
            smiles = [seg["smiles"] for seg in doc.segments if seg["type"] == "molecule"]
            assert len(smiles) == len(atoms) == len(bonds)
            for s, n_atoms, n_bonds in zip(smiles, atoms, bonds):
                size = graph_size(n_atoms, n_bonds)
                got, want = unpacked_graph(block[done : done + size], n_atoms), featurize_molecule(s, 10**9)
                assert got.keys() == want.keys()
                for key in want:
                    assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key]), (s, key)
                done, molecules = done + size, molecules + 1
            assert done == len(block)
    assert molecules >= 50 and molecules == sum(shard["molecules"] for shard in sidecar["shards"]), molecules
    assert any(shard["molecules"] == 0 for shard in sidecar["shards"])  # the proteins' shards


def test_each_table_and_figure_is_one_payload_that_gives_its_jsonl_features(media_indexed, media_corpus, tokenizer,
                                                                           make_config):
    """Megatron reads one sequence per table or figure, a document's between its document indices; a
    figure read from a file is stored as the file's bytes; and unpacked, every payload gives exactly
    the arrays its JSONL segment's featurizer gives (cells' ids, masks and grid; patches)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    enc_cfg = make_config().model.encoders
    sidecar = json.loads((media_indexed / "media.json").read_text())
    assert sidecar["skipped"] == {}
    docs, seen = iter(documents(media_corpus)), Counter()
    for shard in sidecar["shards"]:
        stored = IndexedDataset(str(media_indexed / f"{shard['name']}.payloads"))
        bounds = stored.document_indices.tolist()
        assert len(bounds) == shard["documents"] + 1 and bounds[-1] == len(stored) == shard["tables"] + shard["figures"]
        for first, stop in zip(bounds, bounds[1:]):
            segments = [seg for seg in next(docs).segments if seg["type"] in ("table", "figure")]
            assert stop - first == len(segments)
            for seg, payload in zip(segments, (stored[k] for k in range(first, stop))):
                want = featurize_segment(seg, tokenizer, enc_cfg, media_corpus)
                if seg["type"] == "table":
                    got = payloads_module.unpacked_table(payload)
                else:
                    if "path" in seg:
                        assert payload.tobytes() == (media_corpus / seg["path"]).read_bytes()
                    got = payloads_module.stored_figure_features(payload, enc_cfg.figure)
                assert got.keys() == want.keys()
                for key in want:
                    assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key]), (seg, key)
                seen[seg["type"], "array" in seg, bool(seg.get("caption"))] += 1
    assert next(docs, None) is None
    # inline and file figures, tables with and without captions
    assert min(seen[k] for k in [("figure", True, False), ("figure", False, False), ("table", False, True),
                                 ("table", False, False)]) >= 8, seen


def test_the_saved_tokenizer_has_the_fingerprint_and_another_does_not(indexed, tokenizer):
    assert ScientificTokenizer.load(indexed / "chem.tokenizer").fingerprint() == tokenizer.fingerprint()
    other = ScientificTokenizer.train(["a different corpus of prose, said twice"] * 2, vocab_size=300)
    assert other.fingerprint() != tokenizer.fingerprint()


def test_writing_the_same_input_again_gives_the_same_bytes(indexed, media_indexed, token_corpus, media_corpus,
                                                           tokenizer_dir, tmp_path):
    # the fixtures tokenized in this process; worker processes must write the same bytes
    tokenize_corpus([str(token_corpus / "latex.jsonl")], tokenizer_dir, tmp_path / "latex", workers=2)
    tokenize_corpus([str(media_corpus)], tokenizer_dir, tmp_path / "media", DOCS_PER_SHARD, workers=2)
    names = sorted(path.name for path in media_indexed.iterdir() if path.is_file())
    assert len(names) > 9 and names == sorted(path.name for path in tmp_path.glob("media*") if path.is_file())
    for name in ["latex.json", *(f"latex{suffix}" for suffix in (".bin", ".idx", ".docs.bin", ".docs.idx",
                 ".graphs.bin", ".graphs.idx", ".payloads.bin", ".payloads.idx", ".packing.npy"))]:
        assert (tmp_path / name).read_bytes() == (indexed / name).read_bytes(), name
    for name in names:
        if name != "media.json":  # it names its inputs' paths
            assert (tmp_path / name).read_bytes() == (media_indexed / name).read_bytes(), name
    assert not list(tmp_path.glob("*.tmp-*")), "temporary files were left behind"


# --- the loader --------------------------------------------------------------------------------

@pytest.mark.parametrize("draws", [EVERY_BATCH, ONE_AT_A_TIME], ids=["drawn ahead", "one at a time"])
@pytest.mark.parametrize("balance, block_bits", [(False, stream_module.BLOCK_BITS), (True, stream_module.BLOCK_BITS),
                                                 (True, 2)], ids=["mixed", "skills", "skills, blocks of 4 rows"])
def test_indexed_batches_equal_jsonl_batches(indexed, token_corpus, tokenizer, make_config, balance, block_bits,
                                             draws, monkeypatch):
    """With blocks of 4 rows every stream measures many blocks of its shard's packing index, and steps
    across their bounds, within the first batches. The JSONL loader draws one document at a time; the
    indexed one also draws each batch ahead, its documents taken from the blocks (past a block's end,
    and beyond the draws made ahead, one at a time), and so does a second JSONL loader (draws ahead
    given back)."""
    monkeypatch.setattr(stream_module, "BLOCK_BITS", block_bits)
    monkeypatch.setattr(stream_module, "BLOCK_MASK", (1 << block_bits) - 1)
    extra = ("data.seq_len=64", f"data.balance_skills={balance}")
    modalities = set()
    for split, seed in (("train", 0), ("validation", 1)):
        a = make_loader(jsonl_config(make_config, token_corpus, *extra), tokenizer, split=split, seed=seed)
        a_ahead = make_loader(jsonl_config(make_config, token_corpus, *extra), tokenizer, split=split, seed=seed)
        b = make_loader(indexed_config(make_config, indexed, *extra), tokenizer, split=split, seed=seed)
        for _ in range(6):
            want, got = next_batch(a, ONE_AT_A_TIME), next_batch(b, draws)
            assert batches_equal(want, got)
            assert batches_equal(want, next_batch(a_ahead, draws))
            modalities |= {m for m, idx in got.slot_index.items() if idx.numel()}
        assert a.tokens_by_source == b.tokens_by_source and a.tokens_by_skill == b.tokens_by_skill
        assert a.skips.as_dict() == b.skips.as_dict()
        assert a.state_dict() == a_ahead.state_dict()
    assert modalities >= set(DOMAIN), modalities  # every stored modality reached the encoders


def on_two_ranks(jsonl_cfg, indexed_cfg, tokenizer, batch_size: int, n_batches: int, calls: Counter, draws: int):
    """For data-parallel ranks 0 and 1 of 2: each of n_batches batches of the indexed loader, checked
    equal to the JSONL loader's, with `calls` cleared just before it was made; then the two loaders'
    skips are checked equal. Yields (the indexed batch, its loader)."""
    for rank in (0, 1):
        a = make_loader(jsonl_cfg, tokenizer, batch_size=batch_size, dp_rank=rank, dp_size=2)
        b = make_loader(indexed_cfg, tokenizer, batch_size=batch_size, dp_rank=rank, dp_size=2)
        for _ in range(n_batches):
            want = next_batch(a, ONE_AT_A_TIME)
            calls.clear()
            got = next_batch(b, draws)
            assert batches_equal(want, got)
            yield got, b
        assert a.skips.as_dict() == b.skips.as_dict()


def items_of(batch, modality: str) -> int:
    return int(batch.slot_index[modality].shape[0]) if modality in batch.slot_index else 0


@pytest.mark.parametrize("draws", [EVERY_BATCH, ONE_AT_A_TIME], ids=["drawn ahead", "one at a time"])
@pytest.mark.parametrize("limit", ["molecule.max_len=33", "protein.max_len=150", "latex.max_len=12"])
def test_length_limits_skip_what_they_skip_from_jsonl_on_every_rank(indexed, token_corpus, tokenizer, make_config,
                                                                     limit, draws, monkeypatch):
    """The run's encoders set the limits: an indexed item is held to them by the atom count stored
    with a molecule or by its id count, so the same documents are skipped as too long as from the JSONL
    lines, and each of two data-parallel ranks gets the same rows and features, unpacking the stored
    graphs of its own rows' molecules only and parsing none (the graph is the work that falls with dp)."""
    calls = Counter()
    monkeypatch.setattr(Chem, "MolFromSmiles", counting(calls, "parse", Chem.MolFromSmiles))
    monkeypatch.setattr(layout, "unpacked_graph", counting(calls, "unpack", layout.unpacked_graph))
    extra = ("data.seq_len=64", f"model.encoders.{limit}", "data.max_bad_fraction=1.0")
    featurized = 0
    # 'chem' reads its molecule file, then its protein file: 32 rows reach the proteins
    for got, b in on_two_ranks(jsonl_config(make_config, token_corpus, *extra), indexed_config(make_config, indexed, *extra),
                               tokenizer, 32, 8, calls, draws):
        own = items_of(got, "molecule")
        # one unpack per molecule of this rank's rows, not one for the other rank's, and no RDKit parse
        assert (calls["unpack"], calls["parse"]) == (own, 0), calls
        featurized += own
    assert featurized > 0
    too_long = sum(s["skipped"].get("too_long", 0) for s in b.skips.as_dict().values())
    assert too_long >= 3, b.skips.as_dict()  # the limit bit


@pytest.mark.parametrize("limit", ["", "model.encoders.table.max_len=12"], ids=["no table over max_len", "tables over it"])
def test_tables_and_figures_give_the_jsonl_batches_decoding_only_a_ranks_own(media_indexed, media_corpus, tokenizer,
                                                                            make_config, limit, monkeypatch):
    """From the payloads each of two data-parallel ranks gets the rows and features the JSONL files
    give, skips the same tables as too long (by their stored cell counts), decodes the figures of its
    own rows only and tokenizes no table; from JSONL every rank decodes every figure of the global
    batch (the check that decides the rows)."""
    calls = Counter()
    monkeypatch.setattr(payloads_module, "decoded_figure", counting(calls, "decode", payloads_module.decoded_figure))
    monkeypatch.setattr(table_module, "table_ids", counting(calls, "tokenize", table_module.table_ids))
    extra = ("data.seq_len=64", "data.max_bad_fraction=1.0", *([limit] if limit else []))
    own = {"table": 0, "figure": 0}
    for got, b in on_two_ranks(media_config(make_config, media_corpus, *extra),
                               media_config(make_config, media_indexed / "media", *extra, indexed=True),
                               tokenizer, 16, 6, calls, EVERY_BATCH):
        assert (calls["decode"], calls["tokenize"]) == (items_of(got, "figure"), 0), calls
        for kind in own:
            own[kind] += items_of(got, kind)
    assert min(own.values()) >= 10, own
    too_long = b.skips.as_dict()["media"]["skipped"].get("too_long", 0)
    assert too_long >= 3 if limit else too_long == 0, b.skips.as_dict()


def test_featurize_threads_give_the_batches_of_one_thread(media_indexed, tokenizer, make_config, monkeypatch):
    """data.featurize_threads spreads a batch's items over threads (figures decode and resize there)
    and collates their features in the items' order: the batches are those of the loader's own thread."""
    threads = Counter()
    real = layout.stored_figure_features

    def recording(*args):
        threads[threading.current_thread().name.startswith("scifm-featurize")] += 1
        return real(*args)

    monkeypatch.setattr(layout, "stored_figure_features", recording)
    path = media_indexed / "media"
    one = make_loader(media_config(make_config, path, "data.seq_len=64", indexed=True), tokenizer, batch_size=16)
    three = make_loader(media_config(make_config, path, "data.seq_len=64", "data.featurize_threads=3", indexed=True),
                        tokenizer, batch_size=16)
    for _ in range(4):
        assert batches_equal(one.next_batch(), three.next_batch())
    three.close()
    assert threads[True] > 0 and threads[True] == threads[False], threads  # each figure once per loader


@pytest.mark.parametrize("draws", [EVERY_BATCH, ONE_AT_A_TIME], ids=["drawn ahead", "one at a time"])
def test_an_item_no_row_can_hold_skips_the_document_by_its_id_as_from_jsonl(indexed, token_corpus, tokenizer,
                                                                            make_config, draws):
    """Rows of 4 pairs cannot hold an item's 4 slots and its start marker: a document with one is cut and
    found too long, and its skip is named by the document's id, as the JSONL line's is."""
    extra = ("data.seq_len=4", "data.max_bad_fraction=1.0")
    a = make_loader(jsonl_config(make_config, token_corpus, *extra), tokenizer)
    b = make_loader(indexed_config(make_config, indexed, *extra), tokenizer)
    for _ in range(10):
        assert batches_equal(next_batch(a, ONE_AT_A_TIME), next_batch(b, draws))
    assert a.skips.state_dict() == b.skips.state_dict()
    assert any(reason == "too_long" for _, reason, _ in b.skips.state_dict()["examples"]), b.skips.state_dict()


def test_a_stream_looks_ahead_across_blocks_shards_and_epochs_as_next_reads(indexed, tokenizer, make_config,
                                                                          monkeypatch):
    """IndexedStream.ahead gives, without moving the cursor, the documents next() then reads, one by
    one: over blocks of 4 rows, shards of DOCS_PER_SHARD and the epochs after the first (twice the
    split's documents), refused ones included."""
    monkeypatch.setattr(stream_module, "BLOCK_BITS", 2)
    monkeypatch.setattr(stream_module, "BLOCK_MASK", 3)
    loader = make_loader(indexed_config(make_config, indexed, "data.seq_len=64", "model.encoders.protein.max_len=150"),
                         tokenizer)
    refused, shards = 0, set()
    for stream in loader.streams:
        stream.next()  # start inside a block
        cursor, limit = stream.cursor, 2 * stream._matching + 3
        ahead = [(epoch, shard, int(pos), int(n_ids)) for epoch, shard, _, positions, lengths, _, _ in stream.ahead(limit)
                 for pos, n_ids in zip(positions, lengths)]
        assert stream.cursor == cursor and len(ahead) == limit
        read = []
        for _ in range(limit):
            where, doc, _ = stream.next()
            read.append((*where, REFUSED if isinstance(doc, DocumentFormatError) else doc.n_ids))
        assert ahead == read
        assert ahead[-1][0] == 2  # into the third epoch
        refused += sum(n_ids == REFUSED for *_, n_ids in ahead)
        shards |= {(stream.spec.name, shard) for _, shard, _, _ in ahead}
    assert len(shards) > 2 and refused > 0  # 'chem' is in shards of DOCS_PER_SHARD


@pytest.fixture(scope="module")
def indexed_in_one_shard(tmp_path_factory, token_corpus, tokenizer_dir) -> Path:
    """'chem' and 'latex' as indexed datasets of one shard each: a batch's draws find long runs of
    documents ahead in them."""
    out = tmp_path_factory.mktemp("indexed_one_shard")
    tokenize_corpus([str(token_corpus / "chem")], tokenizer_dir, out / "chem")
    tokenize_corpus([str(token_corpus / "latex.jsonl")], tokenizer_dir, out / "latex")
    return out


@pytest.mark.parametrize("seq_len", [64, 160])
@pytest.mark.parametrize("balance, block_bits", [(False, stream_module.BLOCK_BITS), (True, stream_module.BLOCK_BITS),
                                                 (False, 5)], ids=["mixed", "skills", "mixed, blocks of 32 rows"])
def test_rows_packed_at_once_leave_the_loader_where_one_at_a_time_does(indexed_in_one_shard, tokenizer, make_config,
                                                                        seq_len, balance, block_bits, monkeypatch):
    """A rank packs the rows it does not keep many documents at once (PackedLoader._pass_rows) while the
    draws are indexed documents drawn ahead that each fit a row. Against the same rank packing them one
    document at a time, it must collate the same rows and leave the same state after every batch: the
    mixture's generator, each cursor, the pending document, the skip counts (refused documents
    included: protein.max_len=150 refuses some) and the tokens per source and skill. Rows of 64 cut
    many documents (short runs, the pending document often a cut one), rows of 160 few (long runs);
    blocks of 32 rows end runs where a stream's block ends."""
    monkeypatch.setattr(stream_module, "BLOCK_BITS", block_bits)
    monkeypatch.setattr(stream_module, "BLOCK_MASK", (1 << block_bits) - 1)
    cfg = indexed_config(make_config, indexed_in_one_shard, f"data.seq_len={seq_len}", f"data.balance_skills={balance}",
                         "model.encoders.protein.max_len=150", "data.max_bad_fraction=1.0")
    passed = Counter()
    real_pass = loader_module.PackedLoader._pass_rows

    def counting(self, look, n_rows):
        rows = real_pass(self, look, n_rows)
        passed["rows"] += rows
        return rows

    monkeypatch.setattr(loader_module.PackedLoader, "_pass_rows", counting)
    for rank in (0, 3):
        at_once = make_loader(cfg, tokenizer, batch_size=16, dp_rank=rank, dp_size=4)
        one_at_a_time = make_loader(cfg, tokenizer, batch_size=16, dp_rank=rank, dp_size=4)
        one_at_a_time._pass_rows = lambda look, n_rows: 0
        for _ in range(10):
            assert batches_equal(next_batch(one_at_a_time, EVERY_BATCH), next_batch(at_once, EVERY_BATCH))
            assert at_once.state_dict() == one_at_a_time.state_dict()
    assert sum(s["skipped"].get("too_long", 0) for s in at_once.skips.as_dict().values()) > 0
    # of the 240 rows the two ranks do not keep, a fifth or more (runs end at refused documents and at
    # those cut across rows, many of these documents at rows of 64: there one at a time takes over)
    assert passed["rows"] >= 48, passed


def _verdict(encode):
    """An encoded document's ids and item spans, or the error that refused it."""
    try:
        doc = encode()
    except DocumentFormatError as err:
        return str(err)
    return [int(i) for i in doc.ids], [(it.modality, it.slot_start, it.n_slots) for it in doc.items]


def _measured_and_laid_out(indexed_doc, tokenizer, enc):
    """measure's verdict (the error raised here), then lay_out, checked against measure's length and spans."""
    n_ids, spans = indexed_doc.measure(tokenizer, enc)
    laid_out = EncodedDocument("k", *indexed_doc.lay_out(tokenizer, enc))
    assert (laid_out.n_ids, laid_out.item_spans) == (n_ids, spans)
    return laid_out


def test_an_item_at_its_max_len_passes_and_one_over_it_is_refused_as_from_jsonl(token_corpus, media_corpus, tokenizer,
                                                                                make_config):
    """An indexed document's length checks run over its items at once, from its stored ids, its
    tables' payloads and from its packing index row alone; at each kind's limit set to the document's
    largest item of that kind, and one below, both get encode_document's verdict: the same laid-out
    ids (their number measured by the row), or the same error."""
    base = make_config().model.encoders
    limited = (*DOMAIN, "table")  # a figure has no length limit
    unlimited = dataclasses.replace(base, **{kind: dataclasses.replace(getattr(base, kind), max_len=10**6) for kind in limited})
    reached = Counter()
    docs = [(doc, path.parent) for path in (*(token_corpus / "chem" / name for name in CHEM_FILES),
                                            token_corpus / "latex.jsonl", media_corpus / "made.jsonl",
                                            media_corpus / "statsmodels-tables.jsonl")
            for doc in documents(path)[:12]]
    for doc, base_dir in docs:
        stored = layout.stored_document(doc, tokenizer, base_dir)
        indexed_doc = layout.IndexedDocument(np.array(stored.ids, dtype=np.int64), tuple(stored.atoms), tuple(stored.bonds),
                                             stored.graphs, tuple(np.frombuffer(p, np.uint8) for p in stored.payloads))
        row = np.array([index_row(stored, split_of(doc.id), 0)], dtype=np.int32)
        # each kind's largest item, in what its featurizer checks: atoms, cells, else ids
        sizes = Counter()
        for item in encode_document(doc, tokenizer, unlimited, base_dir).items:
            if item.modality in limited:
                feats = item.features()
                measured = {"molecule": "atom_feats", "table": "cell_ids"}.get(item.modality, "ids")
                sizes[item.modality] = max(sizes[item.modality], len(feats[measured]))
        for kind, size in sizes.items():
            for max_len in (size, size - 1):
                enc = dataclasses.replace(unlimited, **{kind: dataclasses.replace(getattr(base, kind), max_len=max_len)})
                want = _verdict(lambda: encode_document(doc, tokenizer, enc, base_dir))
                got = _verdict(lambda: _measured_and_laid_out(indexed_doc, tokenizer, enc))
                assert got == want, (doc.id, kind, max_len)
                # the row alone: refused, or the laid-out length
                assert laid_out_lengths(row, enc)[0] == (REFUSED if isinstance(want, str) else len(want[0]))
                reached[kind, isinstance(got, str)] += 1
    assert {key for key in reached} == {(kind, refused) for kind in limited for refused in (False, True)}, reached


@pytest.mark.parametrize("draws", [EVERY_BATCH, ONE_AT_A_TIME], ids=["drawn ahead", "one at a time"])
def test_a_rank_reads_only_the_documents_of_its_own_rows_and_those_it_cuts(indexed, tokenizer, make_config,
                                                                          draws, monkeypatch):
    """Every rank measures and checks every document from its packing index row alone; it reads a
    document's ids only where it collates a row of it or cuts it across rows (where its items' slots
    fall), its metadata only where it has molecules, and lays out only its own rows' documents: the
    per-document work falls with dp. Documents are named by their shard and position."""
    cfg = indexed_config(make_config, indexed, "data.seq_len=64")

    def key(layout) -> tuple[str, int]:
        return layout.shard._shard["sha256"], layout.pos

    # the global batches' documents cut across rows, from a loader of the same data at dp=1
    reference = make_loader(cfg, tokenizer, batch_size=16)
    cut = {key(chunk.doc) for _ in range(4) for row in reference.next_rows() for chunk in row.chunks
           if chunk.doc.n_ids > 64 + 1}

    read, laid_out = [], Counter()
    own = {}  # id(layout) -> layout, held so that no id is reused
    real_read, real_layout = OpenShard.document, layout.IndexedDocument.lay_out
    real_collate = loader_module.collate_rows
    real_metadata, metadata = OpenShard._metadata, Counter()
    monkeypatch.setattr(OpenShard, "_metadata", lambda self, pos: metadata.update(["reads"]) or real_metadata(self, pos))

    def reading(self, pos):
        doc = real_read(self, pos)
        read.append(((self._shard["sha256"], pos), doc))
        return doc

    real_stored_ids = OpenShard.stored_ids

    def reading_stored_ids(self, pos):  # a document without items, collated as stored
        read.append(((self._shard["sha256"], pos), None))
        return real_stored_ids(self, pos)

    def laying_out(self, *args):
        laid_out[id(self)] += 1
        return real_layout(self, *args)

    def recording(rows, seq_len, *args):
        own.update((id(chunk.doc), chunk.doc) for row in rows for chunk in row.chunks)
        return real_collate(rows, seq_len, *args)

    monkeypatch.setattr(OpenShard, "document", reading)
    monkeypatch.setattr(OpenShard, "stored_ids", reading_stored_ids)
    monkeypatch.setattr(layout.IndexedDocument, "lay_out", laying_out)
    monkeypatch.setattr(loader_module, "collate_rows", recording)
    loader = make_loader(cfg, tokenizer, batch_size=16, dp_rank=1, dp_size=4)
    for _ in range(4):
        next_batch(loader, draws)
    loader_reads = [k for k, _ in read]
    assert len(set(loader_reads)) == len(loader_reads)  # each read once, then kept by its layout
    own_keys = {key(doc) for doc in own.values()}
    assert set(loader_reads) == own_keys | cut, (len((own_keys | cut) - set(loader_reads)),
                                                  len(set(loader_reads) - (own_keys | cut)))
    # laid out once, then kept; a document without items that no cut has read is taken as stored
    taken_as_stored = [doc for doc in own.values() if doc._doc is None]
    assert taken_as_stored and all(doc.shard.prose_only(doc.pos) for doc in taken_as_stored)
    assert laid_out.keys() == {id(doc._doc) for doc in own.values() if doc._doc is not None}
    assert max(laid_out.values()) == 1
    assert cut - own_keys  # some documents were cut across rows but collated by another rank
    drawn = sum(loader.skips.seen.values())
    assert len(read) < drawn / 2, (len(read), drawn)
    # the JSON metadata is read for a document with molecules only (their atom and bond counts)
    assert metadata["reads"] == sum(1 for _, doc in read if doc is not None and doc.atoms) > 0


def test_a_dataset_of_another_format_is_refused_in_one_line(indexed, tokenizer, make_config, tmp_path):
    """A dataset written before tables and figures were stored (format 4: no payload files, a packing
    index without their columns) is named, not misread."""
    for name in ("latex.json", "latex.bin", "latex.idx", "latex.docs.bin", "latex.docs.idx", "latex.graphs.bin",
                 "latex.graphs.idx", "latex.packing.npy"):
        shutil.copy(indexed / name, tmp_path / name)
    shutil.copytree(indexed / "latex.tokenizer", tmp_path / "latex.tokenizer")
    sidecar = json.loads((tmp_path / "latex.json").read_text())
    (tmp_path / "latex.json").write_text(json.dumps(sidecar | {"format": "scifm-indexed/4"}))
    with pytest.raises(DataError, match=r"written in format scifm-indexed/4, this scifm reads scifm-indexed/5; "
                                        r"write the dataset again"):
        make_loader(user_config(make_config, f"[{{path:{tmp_path / 'latex'},kind:indexed}}]"), tokenizer)


def _from_the_two_document_shard(*suffixes):
    def damage(tmp_path):
        for suffix in suffixes:
            shutil.copy(tmp_path / f"two{suffix}", tmp_path / f"three{suffix}")
    return damage


@pytest.mark.parametrize("damage, error", [
    (_from_the_two_document_shard(".graphs.bin", ".graphs.idx"),
     r"three.bin: holds 2/3 documents, its sidecar 3; write the dataset again"),
    (_from_the_two_document_shard(".packing.npy"),
     r"three.packing.npy: holds an array of shape \(2, 18\) \(int32\), its sidecar says 3 documents; write the dataset again"),
    (lambda tmp_path: (tmp_path / "three.packing.npy").write_bytes(b"not an array"),
     r"three.packing.npy: not readable as a packing index \(ValueError: .*\); write the dataset again"),
    (lambda tmp_path: [shutil.copy(tmp_path / f"twice{suffix}", tmp_path / f"three{suffix}")
                       for suffix in (".payloads.bin", ".payloads.idx")],
     r"three.payloads.bin: holds 6 tables and figures, its sidecar 3; write the dataset again"),
], ids=["graphs of another write", "packing index of another write", "packing index not an array",
        "payloads of another write with as many documents"])
def test_a_shard_whose_files_disagree_is_refused_in_one_line(tokenizer, tokenizer_dir, make_config, tmp_path,
                                                              damage, error):
    """A shard's token, metadata, graph and payload datasets and its packing index must hold one
    document each per document, and the payloads one sequence per table and figure: a file from
    another write, or no array at all, is named, not read as the wrong documents."""
    table = {"type": "table", "columns": ["a"], "rows": [["1"]]}
    for name, n, tables in (("three", 3, 1), ("two", 2, 1), ("twice", 3, 2)):
        docs = [{**text_doc(i), "segments": [{"type": "molecule", "smiles": "CCO"}, *[table] * tables]} for i in range(n)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        tokenize_corpus([str(tmp_path / f"{name}.jsonl")], tokenizer_dir, tmp_path / name)
    damage(tmp_path)
    loader = make_loader(user_config(make_config, f"[{{path:{tmp_path / 'three'},kind:indexed}}]"), tokenizer)
    with pytest.raises(DataError, match=error):
        loader.next_batch()


@pytest.mark.parametrize("draws", [EVERY_BATCH, ONE_AT_A_TIME], ids=["drawn ahead", "one at a time"])
def test_epochs_and_shards_wrap_as_the_jsonl_file_does(tokenizer, tokenizer_dir, make_config, tmp_path, draws):
    docs = [text_doc(i) for i in range(40)]
    for i in range(0, 40, 3):
        docs[i]["segments"].append({"type": "protein", "sequence": "MKTAYIAKQRQISFVKSHFSRQ"[: 10 + i % 12]})
    (tmp_path / "small.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    tokenize_corpus([str(tmp_path / "small.jsonl")], tokenizer_dir, tmp_path / "small", 7)
    a = make_loader(user_config(make_config, f"[{{path:{tmp_path / 'small.jsonl'}}}]", "data.seq_len=64"), tokenizer)
    b = make_loader(user_config(make_config, f"[{{path:{tmp_path / 'small'},kind:indexed}}]", "data.seq_len=64"),
                    tokenizer)
    for _ in range(12):
        assert batches_equal(next_batch(a, ONE_AT_A_TIME), next_batch(b, draws))
    assert b.streams[0].cursor[0] >= 2, "the stream did not start a new epoch"


@pytest.mark.parametrize("draws", [EVERY_BATCH, ONE_AT_A_TIME], ids=["drawn ahead", "one at a time"])
def test_indexed_loader_resumes_mid_document_across_shards(indexed, token_corpus, tokenizer, make_config, draws):
    cfg = indexed_config(make_config, indexed, "data.seq_len=32")
    a = make_loader(cfg, tokenizer, batch_size=2)
    for _ in range(300):
        next_batch(a, draws)
        if a.streams[0].cursor[1] >= 1 and a.pending is not None and a.pending[2] > 0:
            break
    assert a.streams[0].cursor[1] >= 1, "the chem stream never left its first shard"
    assert a.pending is not None and a.pending[2] > 0, "no document was split across rows"
    state = json.loads(json.dumps(a.state_dict()))
    b = make_loader(cfg, tokenizer, batch_size=2)
    b.load_state_dict(state)
    for _ in range(5):
        assert batches_equal(next_batch(a, draws), next_batch(b, draws))
    assert a.skips.as_dict() == b.skips.as_dict() and a.tokens_by_skill == b.tokens_by_skill


def test_a_document_drawn_ahead_and_left_for_the_next_batch_resumes(indexed, tokenizer, make_config):
    """A document drawn ahead that does not fit the batch's last row is pending only by its position
    and length (nothing of it read); a checkpoint then holds its cursor, and a resumed loader reads it."""
    cfg = indexed_config(make_config, indexed, "data.seq_len=64")
    a = make_loader(cfg, tokenizer, batch_size=4)
    with drawing(EVERY_BATCH):
        for _ in range(50):
            a.next_batch()
            if a.pending_fit is not None:
                break
        assert a.pending_fit is not None, "no batch ended on a document drawn ahead"
        b = make_loader(cfg, tokenizer, batch_size=4)
        b.load_state_dict(json.loads(json.dumps(a.state_dict())))
        for _ in range(4):
            assert batches_equal(a.next_batch(), b.next_batch())
    assert a.state_dict() == b.state_dict()


def test_resume_after_the_dataset_was_written_again_names_the_shard(token_corpus, tokenizer, tokenizer_dir,
                                                                    make_config, tmp_path):
    tokenize_corpus([str(token_corpus / "latex.jsonl")], tokenizer_dir, tmp_path / "latex", DOCS_PER_SHARD)
    cfg = user_config(make_config, f"[{{path:{tmp_path / 'latex'},kind:indexed}}]", "data.seq_len=32")
    a = make_loader(cfg, tokenizer)
    for _ in range(3):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    tokenize_corpus([str(token_corpus / "latex.jsonl")], tokenizer_dir, tmp_path / "latex", DOCS_PER_SHARD)
    make_loader(cfg, tokenizer).load_state_dict(state)  # the same input writes the same shards
    lines = (token_corpus / "latex.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["segments"][0]["text"] = first["segments"][0]["text"][::-1]
    (tmp_path / "edited.jsonl").write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    tokenize_corpus([str(tmp_path / "edited.jsonl")], tokenizer_dir, tmp_path / "latex", DOCS_PER_SHARD)
    with pytest.raises(DataError, match=r"latex-00000\.bin changed since the checkpoint"):
        make_loader(cfg, tokenizer).load_state_dict(state)


# --- bad input ---------------------------------------------------------------------------------

def test_bad_records_are_counted_and_good_tables_and_figures_stored(tmp_path, tokenizer_dir, capsys):
    docs = [text_doc(i) for i in range(20)]
    docs[5]["segments"] = [{"type": "molecule", "smiles": "C1CC(("}]
    docs[7]["segments"] = [{"type": "table", "columns": ["a"], "rows": [[1]]}]
    docs[9]["segments"] = [{"type": "text", "text": "A plot:"}, {"type": "figure", "array": [[0.0, 1.0]]}]
    docs[13]["segments"] = [{"type": "table", "columns": ["a", "b"], "rows": [[1]]}]  # a ragged row
    docs[15]["segments"] = [{"type": "figure", "path": "nowhere.png"}]
    lines = [json.dumps(d).encode() for d in docs]
    lines[3] = b"{not json"
    lines[11] = b'{"id": "caf\xe9"}'  # Latin-1, not UTF-8
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    whole = gzip.compress(b"".join(json.dumps(text_doc(100 + i)).encode() + b"\n" for i in range(10)))
    (tmp_path / "in" / "b.jsonl.gz").write_bytes(whole[: len(whole) // 2])  # cut short

    main(["data", "tokenize", str(tmp_path / "in"), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    sidecar = json.loads((tmp_path / "out.json").read_text())
    assert sidecar["skipped"] == {"bad_figure": 1, "bad_json": 1, "bad_smiles": 1, "bad_table": 1, "bad_utf8": 1,
                                  "truncated_file": 1}
    assert sidecar["skip_examples"]["bad_json"] == f"{tmp_path / 'in' / 'a.jsonl'}:4"
    assert 15 <= sidecar["documents"] < 25  # a.jsonl's 15 good documents and b's lines before the cut
    assert sum(s["tables"] for s in sidecar["shards"]) == sum(s["figures"] for s in sidecar["shards"]) == 1
    assert sidecar["skip_examples"]["bad_figure"] == f"{tmp_path / 'in' / 'a.jsonl'}:16"
    assert "skipped      1 bad_figure" in out and "skipped      1 bad_table" in out


def test_a_wrong_tokenizer_is_refused_in_one_line(indexed, tokenizer, make_config):
    other = ScientificTokenizer.train(["a different corpus of prose, said twice"] * 2, vocab_size=300)
    with pytest.raises(DataError) as err:
        make_loader(indexed_config(make_config, indexed), other)
    message = str(err.value)
    assert "\n" not in message and "chem.json" in message and "chem.tokenizer" in message


def test_cli_errors_are_one_line(tmp_path, tokenizer_dir, token_corpus, make_config, capsys):
    cases = [
        [str(tmp_path / "missing.jsonl"), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "x")],
        [str(token_corpus / "latex.jsonl"), "--tokenizer", str(tmp_path), "--out", str(tmp_path / "x")],
        [str(token_corpus / "latex.jsonl"), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "x"),
         "--docs-per-shard", "-1"],
        [str(token_corpus / "latex.jsonl"), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "x"),
         "--workers", "0"],
    ]
    for argv in cases:
        with pytest.raises(SystemExit) as exit_:
            main(["data", "tokenize", *argv])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith("scifm: error: ") and err.count("\n") == 1, err
    assert not list(tmp_path.glob("x*")), "a failed command wrote files"
    with pytest.raises(DataError, match=r"nowhere\.json: not found.*scifm data tokenize"):
        resolve_sources(user_config(make_config, f"[{{path:{tmp_path / 'nowhere'},kind:indexed}}]").data)


# --- training ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_training_from_indexed_sources_uses_their_tokenizer_and_resumes_exactly(indexed, media_indexed, make_config,
                                                                               tmp_path):
    """Three indexed sources, one of them of tables and figures, trained and resumed from a checkpoint
    taken mid-way: the same losses after the resume."""
    from scifm.train.trainer import train
    from tests.helpers.run_metrics import losses

    sources = (f"[{{path:{indexed / 'chem'},kind:indexed,name:chem}},{{path:{indexed / 'latex'},kind:indexed,name:latex}},"
               f"{{path:{media_indexed / 'media'},kind:indexed,name:media,weight:2.0}}]")
    common = ("trainer.max_steps=4", "trainer.log_every=1", "trainer.val_every=100", "trainer.ckpt_every=2",
              "trainer.batch_size=2", "data.seq_len=64", "data.val_batches=1")
    full = tmp_path / "full"
    train(user_config(make_config, sources, *common), full)
    sidecar = json.loads((indexed / "chem.json").read_text())
    assert ScientificTokenizer.load(full / "tokenizer").fingerprint() == sidecar["tokenizer"]["fingerprint"]
    assert json.loads((full / "summary.json").read_text())["tokens_by_source"]["media"] > 0
    resumed = tmp_path / "resumed"
    train(user_config(make_config, sources, *common, f"resume={full / 'checkpoints' / 'step_2'}"), resumed)
    want, got = losses(full), losses(resumed)
    assert sorted(got) == [3, 4] and all(got[s] == want[s] for s in got), (want, got)
