"""The built-in corpus: format, facts checked against the raw data, figures, splits, determinism, skips."""

from __future__ import annotations

import importlib.resources
import io
import json
import multiprocessing
import re
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import pytest
from Bio import SeqIO
from Bio.SeqUtils.ProtParam import ProteinAnalysis
from PIL import Image

from scifm.data.corpus import DEFAULT_SOURCES, build_corpus, default_corpus_dir, nci, proteins
from scifm.data.documents import Document, split_of

CAP = 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("corpus") / "built"
    return out, build_corpus(out, max_docs_per_source=CAP, seed=0)


@pytest.fixture(scope="module")
def docs(corpus: tuple[Path, dict]) -> dict[str, list[Document]]:
    out, _ = corpus
    return {
        name: [Document.from_dict(json.loads(line)) for line in (out / f"{name}.jsonl").read_text().splitlines()]
        for name in DEFAULT_SOURCES
    }


def text_of(doc: Document) -> str:
    return "".join(s["text"] for s in doc.segments if s["type"] == "text")


def segments_of(doc: Document, kind: str) -> list[dict]:
    return [s for s in doc.segments if s["type"] == kind]


def rdkit_nci_file(name: str) -> str:
    return (importlib.resources.files("rdkit") / "Data" / "NCI" / name).read_text()


def test_every_source_present_ids_unique_and_counts_reported(corpus, docs):
    _, report = corpus
    all_ids = [d.id for ds in docs.values() for d in ds]
    assert len(all_ids) == len(set(all_ids))
    for name, ds in docs.items():
        assert 0 < len(ds) <= CAP, name
        assert all(d.source == name for d in ds)
        assert report["docs_per_source"][name] == len(ds)
    assert report["total_docs"] == len(all_ids)
    assert sum(report["docs_per_skill"].values()) == len(all_ids)
    modalities = {s["type"] for ds in docs.values() for d in ds for s in d.segments}
    assert modalities == {"text", "molecule", "protein", "table", "figure", "latex"}


def test_tpsa_matches_reference_csv(docs):
    smiles_by_entry = {
        entry: smi for smi, entry in (line.split("\t") for line in rdkit_nci_file("first_5K.smi").splitlines())
    }
    lines = [line for line in rdkit_nci_file("first_5k.tpsa.csv").splitlines() if not line.startswith("#")]
    tpsa = {smi: float(value) for smi, value in (line.rsplit(",", 1) for line in lines)}
    for doc in docs["rdkit-nci"]:
        smiles = smiles_by_entry[str(int(doc.id.removeprefix("nci-")))]
        text = text_of(doc)
        assert f"{tpsa[smiles]:.2f}" in text, doc.id
        mols = segments_of(doc, "molecule")
        # inline SMILES are followed by a space, so the tokenizer can detect them as one span
        assert [m["smiles"] for m in mols] == [smiles] or f" {smiles} " in text, doc.id


def test_sdf_properties_come_from_the_sdf_fields(docs):
    from rdkit import Chem

    data = (importlib.resources.files("rdkit") / "Data" / "NCI" / "first_200.props.sdf").read_bytes()
    records = list(Chem.ForwardSDMolSupplier(io.BytesIO(data)))
    checked = 0
    for doc in docs["rdkit-nci-props"]:
        if doc.skill == "mol.rings":
            mol = records[int(doc.id.split("-")[1])]
            assert f" {mol.GetProp('NUM_RINGS')}." in text_of(doc), doc.id
            checked += 1
        if doc.skill == "mol.profile":
            mol = records[int(doc.id.split("-")[1])]
            rows = dict(segments_of(doc, "table")[0]["rows"])
            assert rows["number of hydrogen-bond donors"] == int(mol.GetProp("NUM_HDONORS"))
            checked += 1
    assert checked


def test_protein_facts_match_protparam(docs):
    text = (
        importlib.resources.files("pyhmmer") / "tests" / "data" / "seqs" / "938293.PRJEB85.HG003687.faa"
    ).read_text()
    sequences = {rec.id: str(rec.seq).rstrip("*") for rec in SeqIO.parse(io.StringIO(text), "fasta")}
    seen_skills = set()
    for doc in docs["pyhmmer-proteome"]:
        seq = sequences[doc.id.removeprefix("prot-")]
        body = text_of(doc)
        assert [p["sequence"] for p in segments_of(doc, "protein")] == [seq] or f" {seq} " in body
        if doc.skill == "protein.length":
            assert f" {len(seq)} " in body or f" {len(seq)}." in body, doc.id
        if doc.skill == "protein.mw":
            assert f"{ProteinAnalysis(seq).molecular_weight():.1f}" in body, doc.id
        if doc.skill == "protein.pi":
            assert f"{ProteinAnalysis(seq).isoelectric_point():.2f}" in body, doc.id
        seen_skills.add(doc.skill)
    assert {"protein.length", "protein.mw"} <= seen_skills


def answer_column(doc: Document, table: dict) -> str:
    """The numeric column the question names (the longest name found, since names can nest)."""
    body = text_of(doc)
    named = [
        c
        for c in table["columns"][1:]
        if c in body and all(isinstance(r[table["columns"].index(c)], (int, float)) for r in table["rows"])
    ]
    return max(named, key=len)


@pytest.mark.parametrize("source", ["sklearn-tables", "statsmodels-tables"])
def test_table_answers_are_computed_from_the_rows_shown(docs, source):
    checked = set()
    for doc in docs[source]:
        (table,) = segments_of(doc, "table")
        if doc.skill not in ("table.argmax", "table.argmin", "table.mean"):
            continue
        j = table["columns"].index(answer_column(doc, table))
        column = [r[j] for r in table["rows"]]
        if doc.skill == "table.mean":
            mean = sum(column) / len(column)
            numbers = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", doc.segments[-1]["text"])]
            assert any(abs(n - mean) <= 5e-4 * abs(mean) for n in numbers), doc.id
        else:
            pick = max if doc.skill == "table.argmax" else min
            best = pick(table["rows"], key=lambda r: r[j])
            assert f"{table['columns'][0]} {best[0]}".lower() in text_of(doc).lower(), doc.id
        checked.add(doc.skill)
    assert checked


def test_figures_exist_and_open(corpus, docs):
    out, report = corpus
    paths = [s["path"] for ds in docs.values() for d in ds for s in segments_of(d, "figure")]
    assert paths and all(p.startswith("figures/") for p in paths)
    for p in set(paths):
        with Image.open(out / p) as im:
            im.load()
            assert im.size[0] > 0 and im.size[1] > 0
    for doc in docs["matplotlib-plots"]:
        with Image.open(out / segments_of(doc, "figure")[0]["path"]) as im:
            assert im.size == (160, 120)
    assert report["figures"] == len(list((out / "figures").glob("*.png"))) == len(set(paths))


def test_split_manifest_agrees_with_split_of(corpus, docs):
    out, report = corpus
    manifest = json.loads((out / "splits.json").read_text())
    ids = [d.id for ds in docs.values() for d in ds]
    for split in ("validation", "test"):
        assert manifest[split] == sorted(i for i in ids if split_of(i) == split)
        assert manifest[split]
    assert not set(manifest["validation"]) & set(manifest["test"])
    assert manifest["counts"]["train"] == sum(split_of(i) == "train" for i in ids) > 0
    assert sum(manifest["counts"].values()) == len(ids)
    assert report["splits"] == manifest["counts"]


def test_same_seed_is_byte_identical_and_rebuilds_are_cached(corpus, tmp_path):
    out, report = corpus
    again = tmp_path / "again"
    assert build_corpus(again, max_docs_per_source=CAP, seed=0) == report
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (out / rel).read_bytes() == (again / rel).read_bytes(), rel
    stamp = (again / "rdkit-nci.jsonl").stat().st_mtime_ns
    assert build_corpus(again, max_docs_per_source=CAP, seed=0) == report
    assert (again / "rdkit-nci.jsonl").stat().st_mtime_ns == stamp


def test_concurrent_builds_agree(tmp_path):
    out = tmp_path / "shared"
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        reports = list(pool.map(partial(build_corpus, max_docs_per_source=3), [out, out]))
    assert reports[0] == reports[1] == json.loads((out / "build_report.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == [".shared.lock", "shared"]


def test_bad_raw_records_are_skipped_and_counted(tmp_path, monkeypatch):
    real_molecules = nci.read_tpsa_records
    real_proteins = proteins.read_protein_records
    monkeypatch.setattr(nci, "read_tpsa_records", lambda: [("99999", "C1CC(", 1.0)] + real_molecules())
    bad_protein = proteins.ProteinRecord("bad_1", "bad_1 # 1 # 30 # 1 # ID=1", "MKTAYZZB1*")
    monkeypatch.setattr(proteins, "read_protein_records", lambda: [bad_protein] + real_proteins())
    out = tmp_path / "corrupt"
    report = build_corpus(out, max_docs_per_source=5, seed=0)
    assert report["skipped"]["rdkit-nci"]["skipped"] == {"unparsable_smiles": 1}
    assert report["skipped"]["pyhmmer-proteome"]["skipped"] == {"non_amino_acid": 1}
    assert report["docs_per_source"]["rdkit-nci"] == 5
    ids = [json.loads(line)["id"] for line in (out / "rdkit-nci.jsonl").read_text().splitlines()]
    assert "nci-99999" not in ids


def test_default_corpus_dir_follows_scifm_cache(monkeypatch, tmp_path):
    from scifm.data.corpus import CORPUS_VERSION

    monkeypatch.setenv("SCIFM_CACHE", str(tmp_path))
    assert default_corpus_dir() == tmp_path / f"corpus-v{CORPUS_VERSION}"
    monkeypatch.delenv("SCIFM_CACHE")
    assert default_corpus_dir() == Path.home() / ".cache" / "scifm" / f"corpus-v{CORPUS_VERSION}"


def test_refuses_to_replace_a_directory_that_is_not_a_corpus(tmp_path):
    from scifm.core.errors import DataError

    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a scifm corpus"):
        build_corpus(tmp_path, max_docs_per_source=1)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
