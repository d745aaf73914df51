"""Encoding, chunking, packing, mixture sampling and the resumable loader."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from scifm.data.documents import Document, split_of
from scifm.data.encode import EncodedDocument, EncodedItem, encode_document
from scifm.data.loader import PackedLoader
from scifm.data.mixture import source_probabilities, stream_probabilities
from scifm.data.packing import placeholder_features, IGNORE_INDEX, Row, chunk_document, collate_rows
from scifm.data.streams import resolve_sources
from scifm.core.errors import BadFractionExceeded, DataError, DocumentFormatError

ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"


def make_loader(cfg, tokenizer, split="train", batch_size=4, seed=0, **kw):
    return PackedLoader(cfg.data, resolve_sources(cfg.data), tokenizer, cfg.model.encoders,
                        split=split, batch_size=batch_size, seed=seed, **kw)


def batches_equal(a, b) -> bool:
    same = all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("input_ids", "labels", "positions", "doc_ids"))
    same &= a.slot_index.keys() == b.slot_index.keys()
    same &= all(torch.equal(a.slot_index[m], b.slot_index[m]) for m in a.slot_index)
    for m in a.items:
        same &= all(torch.equal(a.items[m][k], b.items[m][k]) for k in a.items[m])
    return bool(same)


def write_user_corpus(path: Path, docs: list[dict], gz: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(d) + "\n" for d in docs)
    if gz:
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)


def text_doc(i: int, skill: str = "prose", source: str = "user") -> dict:
    return {"id": f"{source}-{i}", "source": source, "skill": skill,
            "segments": [{"type": "text", "text": f"Document {i} says that water boils at 100 degrees."}]}


# --- encoding and chunking --------------------------------------------------------------------

def test_encode_document_lays_out_markers_and_slots(tokenizer, make_config):
    cfg = make_config()
    doc = Document("d", "s", "k", [{"type": "text", "text": "Aspirin is "},
                                   {"type": "molecule", "smiles": ASPIRIN},
                                   {"type": "text", "text": " a drug."}])
    enc = encode_document(doc, tokenizer, cfg.model.encoders, Path("."))
    k = cfg.model.encoders.molecule.slots
    (item,) = enc.items
    assert enc.ids[0] == tokenizer.bos_id and enc.ids[-1] == tokenizer.eos_id
    assert enc.ids[item.slot_start - 1] == tokenizer.start_id("molecule")
    assert enc.ids[item.slot_start : item.slot_start + k] == [tokenizer.slot_id("molecule")] * k
    assert enc.ids[item.slot_start + k] == tokenizer.end_id("molecule")
    assert tokenizer.decode(enc.ids[1 : item.slot_start - 1]) == "Aspirin is "


def test_bad_segment_raises_counted_reason(tokenizer, make_config):
    cfg = make_config()
    doc = Document("d", "s", "k", [{"type": "molecule", "smiles": "C1CC(("}])
    with pytest.raises(DocumentFormatError) as err:
        encode_document(doc, tokenizer, cfg.model.encoders, Path("."))
    assert err.value.reason == "bad_smiles"


def synthetic_doc(n_ids: int, items: list[tuple[int, int]]) -> EncodedDocument:
    """ids 0..n-1 with items given as (slot_start, n_slots)."""
    return EncodedDocument("k", list(range(n_ids)),
                           [EncodedItem("molecule", s, k, {}) for s, k in items])


def test_chunks_cover_every_pair_and_never_cut_an_item():
    doc = synthetic_doc(60, [(9, 8), (25, 8), (44, 8)])
    chunks = chunk_document(doc, seq_len=16)
    assert chunks[0].start == 0 and chunks[-1].stop == 59
    assert all(a.stop == b.start for a, b in zip(chunks, chunks[1:]))
    assert all(1 <= c.length <= 16 for c in chunks)
    placed = [it.slot_start for c in chunks for it in c.items()]
    assert sorted(placed) == [9, 25, 44]  # every item lands whole in exactly one chunk


def test_item_longer_than_a_row_is_too_long():
    with pytest.raises(DocumentFormatError) as err:
        chunk_document(synthetic_doc(40, [(5, 20)]), seq_len=16)
    assert err.value.reason == "too_long"


# --- packing into a batch ---------------------------------------------------------------------

def test_collate_masks_slots_restarts_positions_and_points_at_slots(tokenizer, make_config):
    cfg = make_config()
    docs = [
        Document("a", "s", "k", [{"type": "text", "text": "TPSA of "}, {"type": "molecule", "smiles": ASPIRIN},
                                 {"type": "text", "text": " is 63.6."}]),
        Document("b", "s", "k", [{"type": "text", "text": "A second document."}]),
    ]
    encoded = [encode_document(d, tokenizer, cfg.model.encoders, Path(".")) for d in docs]
    row = Row([chunk_document(e, 128)[0] for e in encoded])
    placeholders = placeholder_features(tokenizer, cfg.model.encoders)
    batch = collate_rows([row], 128, tokenizer, placeholders)
    # a modality without items gets the loader's placeholder inputs, collated once, and no slots
    assert batch.items.keys() == placeholders.keys()
    for modality in placeholders.keys() - {"molecule"}:
        assert batch.items[modality] is placeholders[modality] and batch.slot_index[modality].numel() == 0
    slot = tokenizer.slot_id("molecule")
    flat = batch.input_ids.flatten()
    assert torch.all(flat[batch.slot_index["molecule"].flatten()] == slot)
    n_a = row.chunks[0].length
    assert batch.positions[0, :n_a].tolist() == list(range(n_a))
    assert batch.positions[0, n_a : n_a + 3].tolist() == [0, 1, 2]
    assert set(batch.doc_ids[0, : row.used].tolist()) == {0, 1} and torch.all(batch.doc_ids[0, row.used :] == -1)
    labels = batch.labels[0]
    assert not torch.any(labels == slot) and not torch.any(labels == tokenizer.end_id("molecule"))
    assert torch.all(labels[row.used :] == IGNORE_INDEX)
    # the last target of document a is its EOS, never the first token of document b
    assert labels[n_a - 1] == tokenizer.eos_id


# --- loader: determinism, resume, ranks ------------------------------------------------------

def test_loader_is_deterministic_and_resumes_with_the_exact_next_batch(tokenizer, make_config):
    cfg = make_config("data.seq_len=64")  # short rows: documents get split, chunks stay pending
    a = make_loader(cfg, tokenizer)
    for _ in range(3):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # must survive JSON
    b = make_loader(cfg, tokenizer)
    b.load_state_dict(state)
    for _ in range(3):
        assert batches_equal(a.next_batch(), b.next_batch())
    assert a.tokens_by_source == b.tokens_by_source
    fresh = make_loader(cfg, tokenizer)
    replay = [fresh.next_batch() for _ in range(6)]
    c = make_loader(cfg, tokenizer)
    assert all(batches_equal(x, c.next_batch()) for x in replay)


def test_resume_restores_a_partly_emitted_document(tokenizer, make_config):
    cfg = make_config("data.seq_len=32")
    a = make_loader(cfg, tokenizer, batch_size=1)
    for _ in range(40):
        a.next_batch()
        if a.pending is not None and a.pending[2] > 0:
            break
    assert a.pending is not None and a.pending[2] > 0, "no document was split across rows"
    b = make_loader(cfg, tokenizer, batch_size=1)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(5):
        assert batches_equal(a.next_batch(), b.next_batch())


def test_data_parallel_ranks_split_the_global_batch(tokenizer, make_config):
    cfg = make_config()
    whole = make_loader(cfg, tokenizer, batch_size=4).next_batch()
    parts = [make_loader(cfg, tokenizer, batch_size=4, dp_rank=r, dp_size=2).next_batch() for r in range(2)]
    assert torch.equal(parts[0].input_ids, whole.input_ids[0::2])
    assert torch.equal(parts[1].input_ids, whole.input_ids[1::2])


def test_validation_split_is_disjoint_from_train(tokenizer, make_config):
    cfg = make_config()
    loader = make_loader(cfg, tokenizer, split="validation", batch_size=2)
    seen = [loader.streams[i].next()[1] for i in range(len(loader.streams))]
    assert all(split_of(d.id) == "validation" for d in seen if isinstance(d, Document))


# --- user corpora, mixture, bad data ----------------------------------------------------------

def user_config(make_config, sources: str, *extra: str):
    return make_config(f"data.sources={sources}", *extra)


def test_user_sources_stream_gzip_and_directories_with_mixture_weights(tmp_path, tokenizer, make_config):
    write_user_corpus(tmp_path / "heavy" / "part1.jsonl.gz", [text_doc(i, source="heavy") for i in range(300)], gz=True)
    write_user_corpus(tmp_path / "heavy" / "sub" / "part2.jsonl", [text_doc(i + 300, source="heavy") for i in range(300)])
    write_user_corpus(tmp_path / "light.jsonl", [text_doc(i, source="light") for i in range(300)])
    cfg = user_config(make_config, f"[{{path:{tmp_path / 'heavy'},weight:3.0}},{{path:{tmp_path / 'light.jsonl'},weight:1.0}}]")
    loader = make_loader(cfg, tokenizer, batch_size=8)
    assert [len(s.spec.files) for s in loader.streams] == [2, 1]
    for _ in range(20):
        loader.next_batch()
    share = loader.tokens_by_source["heavy"] / sum(loader.tokens_by_source.values())
    assert 0.68 < share < 0.82  # weight 3:1 -> 75% of tokens


def test_temperature_flattens_and_skill_balance_equalises():
    assert np.allclose(source_probabilities([3.0, 1.0], 1.0), [0.75, 0.25])
    hot = source_probabilities([3.0, 1.0], 100.0)
    assert abs(hot[0] - 0.5) < 0.01
    probs, layout = stream_probabilities([1.0], 1.0, [Counter({"common": 990, "rare": 10})])
    assert layout == [(0, "common"), (0, "rare")] and np.allclose(probs, [0.5, 0.5])


def test_balance_skills_lifts_a_rare_skill(tmp_path, tokenizer, make_config):
    docs = [text_doc(i, skill="rare" if i % 50 == 0 else "common") for i in range(2000)]
    write_user_corpus(tmp_path / "c.jsonl", docs)
    src = f"[{{path:{tmp_path / 'c.jsonl'}}}]"
    counts = {}
    for balance in (False, True):
        loader = make_loader(user_config(make_config, src, f"data.balance_skills={balance}"), tokenizer)
        for _ in range(10):
            loader.next_batch()
        counts[balance] = loader.tokens_by_skill["rare"] / sum(loader.tokens_by_skill.values())
    assert counts[False] < 0.06 and 0.35 < counts[True] < 0.65


def test_bad_records_are_skipped_and_counted(tmp_path, tokenizer, make_config):
    docs = [text_doc(i) for i in range(400)]
    lines = [json.dumps(d) for d in docs]
    lines[5] = "{not json"
    bad_mol = {"id": "user-bad", "source": "user", "skill": "x",
               "segments": [{"type": "molecule", "smiles": "C1CC(("}]}
    lines[7] = json.dumps(bad_mol | {"id": next(f"b{i}" for i in range(999) if split_of(f"b{i}") == "train")})
    (tmp_path / "u.jsonl").write_text("\n".join(lines) + "\n")
    cfg = user_config(make_config, f"[{{path:{tmp_path / 'u.jsonl'}}}]")
    loader = make_loader(cfg, tokenizer)
    for _ in range(30):
        loader.next_batch()
    skipped = loader.skips.as_dict()["u"]["skipped"]
    assert skipped.get("bad_json", 0) >= 1 and skipped.get("bad_smiles", 0) >= 1


def test_bad_fraction_budget_stops_with_source_reason_and_example(tmp_path, tokenizer, make_config):
    lines = [json.dumps(text_doc(i)) if i % 3 else '{"id": 1}' for i in range(300)]
    (tmp_path / "broken.jsonl").write_text("\n".join(lines) + "\n")
    cfg = user_config(make_config, f"[{{path:{tmp_path / 'broken.jsonl'}}}]")
    loader = make_loader(cfg, tokenizer)
    with pytest.raises(BadFractionExceeded, match=r"source 'broken'.*bad_field.*broken.jsonl:\d+"):
        for _ in range(50):
            loader.next_batch()


def test_missing_source_and_empty_split_are_clear_errors(tmp_path, tokenizer, make_config):
    with pytest.raises(DataError, match="no such file"):
        resolve_sources(user_config(make_config, f"[{{path:{tmp_path / 'nope.jsonl'}}}]").data)
    one = next(i for i in range(999) if split_of(f"user-{i}") == "train")
    write_user_corpus(tmp_path / "tiny.jsonl", [text_doc(one)])
    cfg = user_config(make_config, f"[{{path:{tmp_path / 'tiny.jsonl'}}}]")
    with pytest.raises(DataError, match="no documents in the validation split"):
        make_loader(cfg, tokenizer, split="validation").next_batch()


def test_figure_paths_resolve_beside_their_document_file_from_any_directory(tmp_path, tokenizer, make_config,
                                                                           monkeypatch):
    import matplotlib.image

    data = tmp_path / "data" / "sub"
    (data / "figs").mkdir(parents=True)
    matplotlib.image.imsave(data / "figs" / "plot.png", np.linspace(0, 1, 32 * 48).reshape(32, 48))
    docs = [{"id": f"fig-{i}", "source": "user", "skill": "figure",
             "segments": [{"type": "text", "text": f"Figure {i} shows a gradient."},
                          {"type": "figure", "path": "figs/plot.png"}]} for i in range(200)]
    write_user_corpus(data / "figs.jsonl", docs)
    monkeypatch.chdir(tmp_path)  # relative to the file, not to the working directory
    loader = make_loader(user_config(make_config, f"[{{path:{tmp_path / 'data'}}}]"), tokenizer)
    batch = loader.next_batch()
    assert batch.slot_index["figure"].numel() > 0
    assert loader.skips.as_dict()["data"]["skipped"] == {}
