"""Built-in QA tasks: every task loads; no item comes from a train-split record (ids recomputed here);
answers re-checked against the raw data with RDKit, Biopython, SymPy and numpy; well-formed options;
redefinitions contradict memory; figures exist; a cached rebuild does nothing."""

from __future__ import annotations

import importlib.resources
import io
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sympy as sp
from Bio import SeqIO
from Bio.Data import CodonTable
from Bio.Data.IUPACData import protein_letters_1to3
from Bio.SeqUtils.ProtParam import ProteinAnalysis
from PIL import Image
from rdkit import Chem
from rdkit.Chem import rdMolDescriptors

from scifm.data.corpus.table_data import all_tables
from scifm.data.documents import split_of
from scifm.eval.builtin import BUILTIN_TASK_NAMES, BUILTIN_TASKS, build_builtin_tasks, default_tasks_dir
from scifm.eval.builtin.common import MAX_ITEMS, TaskContext
from scifm.eval.builtin.held_out import corpus_documents
from scifm.eval.tasks import load_task_file

TWO_OPTION_SKILLS = {"latex.equiv", "fig.line_trend"}  # yes/no, higher/lower


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tasks") / "built"
    return out, build_builtin_tasks(out, seed=0)


@pytest.fixture(scope="session")
def items(built) -> dict[str, list[dict]]:
    out, _ = built
    return {name: [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
            for name in BUILTIN_TASK_NAMES}


def right(item: dict) -> str:
    return item["choices"][item["answer"]].strip()


def rdkit_file(*parts: str) -> str:
    return importlib.resources.files("rdkit").joinpath("Data", "NCI", *parts).read_text()


def test_every_task_is_present_loads_and_is_reported(built, items):
    out, report = built
    assert tuple(BUILTIN_TASKS) == BUILTIN_TASK_NAMES
    for name in BUILTIN_TASK_NAMES:
        loaded = load_task_file(out / f"{name}.jsonl")
        assert 0 < len(loaded) <= MAX_ITEMS, name
        assert report["items_per_task"][name] == len(loaded)
        assert sum(report["items_per_skill"][name].values()) == len(loaded)
        assert {i.skill for i in loaded} == set(report["items_per_skill"][name])
    assert json.loads((out / "tasks_report.json").read_text()) == report
    assert "train_split" in report["skipped"]["tpsa"]


# The id rule of each corpus source, written out here independently of the package.
def corpus_ids(source: str, record: dict, skill: str) -> list[str]:
    if source == "rdkit-nci":
        return [f"nci-{int(record['entry']):05d}"]
    if source == "rdkit-nci-props":
        return [f"nciprop-{record['index']}-profile"]
    if source == "pyhmmer-proteome":
        return [f"prot-{record['protein_id']}"]
    if source == "biopython-codons":
        if "codon" not in record:
            return [f"codon-{record['table_id']}-start"]
        tables, codon = CodonTable.unambiguous_dna_by_id, record["codon"]

        def reads(t: int) -> tuple:
            return tables[t].forward_table.get(codon), codon in tables[t].stop_codons

        table_id = record["table_id"] if reads(record["table_id"]) != reads(1) else 1
        return [f"codon-{table_id}-{codon}"]
    if source == "rdkit-elements":
        kind = "element" if skill.startswith("redefine") else skill.split(".")[1]
        return [f"element-{record['z']:03d}-{kind}"]
    if source in ("sklearn-tables", "statsmodels-tables"):
        return []  # the record is the document itself; its table is checked below
    if source == "sympy-generated":
        return []
    assert source == "sympy-constants", source
    return []


def test_no_item_comes_from_a_train_split_record(items):
    for task_items in items.values():
        for item in task_items:
            prov = item["provenance"]
            for doc_id in corpus_ids(prov["source"], prov["record"], item["skill"]):
                assert doc_id in prov["doc_ids"], item["id"]
            assert all(split_of(d) == "test" for d in prov["doc_ids"]), item["id"]
            if prov["source"] == "sympy-constants":
                assert prov["doc_ids"] == []
            else:
                assert prov["doc_ids"], item["id"]
            if prov["source"].endswith("-tables"):
                assert prov["doc_ids"][0].startswith(f"tab-{prov['record']['table']}-")


def test_multiple_choice_items_are_well_formed(items):
    for task_items in items.values():
        for item in task_items:
            if item["type"] != "multiple_choice":
                continue
            choices = item["choices"]
            assert len(choices) == (2 if item["skill"] in TWO_OPTION_SKILLS else 4), item["id"]
            assert len(set(choices)) == len(choices) and all(c.startswith(" ") for c in choices), item["id"]
            assert 0 <= item["answer"] < len(choices)
    # the answer's position is shuffled, not always first
    positions = {item["answer"] for item in items["tpsa"] if item["type"] == "multiple_choice"}
    assert positions == {0, 1, 2, 3}


def test_tpsa_answers_are_rdkit_reference_values(items):
    lines = [line for line in rdkit_file("first_5k.tpsa.csv").splitlines() if line and not line.startswith("#")]
    reference = {smi: float(v) for smi, v in (line.rsplit(",", 1) for line in lines)}
    disagree = 0
    for item in items["tpsa"]:
        smiles = next(s["smiles"] for s in item["question"] if s["type"] == "molecule")
        value = reference[smiles]
        if item["type"] == "multiple_choice":
            assert right(item) == f"{value:.2f}"
        else:
            assert item["answer"] == value and item["rel_tol"] == 0.01
        disagree += abs(rdMolDescriptors.CalcTPSA(Chem.MolFromSmiles(smiles)) - value) > 0.01
    assert disagree <= 0.02 * len(items["tpsa"])  # RDKit's own TPSA reproduces its reference file


def test_mol_props_answers_are_the_sdf_fields(items):
    data = importlib.resources.files("rdkit").joinpath("Data", "NCI", "first_200.props.sdf").read_bytes()
    mols = list(Chem.ForwardSDMolSupplier(io.BytesIO(data)))
    for item in items["mol_props"]:
        record = item["provenance"]["record"]
        mol = mols[int(record["index"])]
        value = float(mol.GetProp(record["field"]))
        assert Chem.MolToSmiles(mol) == record["smiles"]
        if item["type"] == "multiple_choice":
            assert float(right(item).removesuffix(" g/mol")) == pytest.approx(value, rel=1e-5)
        else:
            assert item["answer"] == pytest.approx(value)


def test_codon_answers_follow_biopython_tables(items):
    names = {"A": "alanine", "R": "arginine", "N": "asparagine", "D": "aspartic acid", "C": "cysteine",
             "Q": "glutamine", "E": "glutamic acid", "G": "glycine", "H": "histidine", "I": "isoleucine",
             "L": "leucine", "K": "lysine", "M": "methionine", "F": "phenylalanine", "P": "proline",
             "S": "serine", "T": "threonine", "W": "tryptophan", "Y": "tyrosine", "V": "valine"}
    for item in items["codon"]:
        record = item["provenance"]["record"]
        table = CodonTable.unambiguous_dna_by_id[record["table_id"]]
        if item["skill"] == "bio.start_codon":
            assert right(item) == ", ".join(table.start_codons)
            continue
        codon = record["codon"]
        assert codon in item["question"][0]["text"] or codon.replace("T", "U") in item["question"][0]["text"]
        aa = table.forward_table.get(codon)
        if aa is None:
            assert right(item) == "a stop signal"
        else:
            assert f"{names[aa]} ({protein_letters_1to3[aa]}, {aa})" in right(item)
            assert ("stop" in right(item)) == (codon in table.stop_codons)


def test_protein_answers_recomputed_with_protparam(items):
    fasta = importlib.resources.files("pyhmmer").joinpath("tests", "data", "seqs", "938293.PRJEB85.HG003687.faa")
    sequences = {r.id: str(r.seq).rstrip("*") for r in SeqIO.parse(io.StringIO(fasta.read_text()), "fasta")}
    for item in items["protein_props"][::3]:
        seq = sequences[item["provenance"]["record"]["protein_id"]]
        assert next(s["sequence"] for s in item["question"] if s["type"] == "protein") == seq
        analysis = ProteinAnalysis(seq)
        if item["type"] == "short_answer":
            assert item["answer"] == len(seq) and item["rel_tol"] == item["abs_tol"] == 0
        elif item["skill"] == "protein.length":
            assert right(item) == str(len(seq))
        elif item["skill"] == "protein.mw":
            assert right(item) == f"{analysis.molecular_weight():.1f} Da"
        else:
            assert right(item) == f"about {analysis.isoelectric_point():.2f}"


def test_latex_equivalence_decided_by_sympy(items):
    x = sp.Symbol("x")
    docs = corpus_documents("sympy-generated")  # cached by the build in this process
    for item in items["latex_equiv"]:
        prov = item["provenance"]
        answer = sp.sympify(prov["record"]["answer"], locals={"x": x})
        doc = docs[prov["doc_ids"][0]]
        shown = next(s["latex"] for s in doc.segments if s["type"] == "latex")
        latex_segs = [s["latex"] for s in item["question"] if s["type"] == "latex"]
        assert latex_segs[0] == shown
        text = "".join(s.get("text", "") for s in doc.segments)
        assert prov["record"]["answer"] + "." in text  # the answer is the one the corpus states
        if item["skill"] == "latex.equiv":
            other = sp.sympify(prov["record"]["other"], locals={"x": x})
            assert (right(item) == "yes") == (sp.simplify(answer - other) == 0)
            # printed as written (3 (x + 2) (x + 3)), or as its value for a number
            unevaluated = sp.parse_expr(prov["record"]["other"], local_dict={"x": x}, evaluate=False)
            assert latex_segs[1] in (sp.latex(other), sp.latex(unevaluated))
        else:
            assert right(item) == prov["record"]["answer"]
            for i, choice in enumerate(item["choices"]):
                if i != item["answer"]:
                    assert sp.simplify(sp.sympify(choice, locals={"x": x}) - answer) != 0, choice


def test_table_answers_recomputed_with_numpy(items):
    tables = {t.name: t for t in all_tables()}
    for item in items["table_qa"]:
        table_seg = next(s for s in item["question"] if s["type"] == "table")
        source_rows = {tuple(r) for r in _project(tables[item["provenance"]["record"]["table"]], table_seg["columns"])}
        assert all(tuple(r) in source_rows for r in table_seg["rows"])  # real rows of the named table
        col = re.search(r"'(.+)' column|average the (.+) column", item["question"][-1]["text"])
        col = col[1] or col[2]
        j = table_seg["columns"].index(col)
        values = np.array([r[j] for r in table_seg["rows"]], dtype=float)
        labels = [r[0] for r in table_seg["rows"]]
        key = table_seg["columns"][0].lower()
        if item["skill"] == "table.argmax":
            assert right(item) == f"{key} {labels[int(np.argmax(values))]}"
        elif item["skill"] == "table.argmin":
            assert right(item) == f"{key} {labels[int(np.argmin(values))]}"
        elif item["type"] == "short_answer":
            assert item["answer"] == pytest.approx(float(np.mean(values)), rel=1e-9)
        else:
            assert float(right(item)) == pytest.approx(float(np.mean(values)), rel=1e-3, abs=1e-12)


def _project(table, columns: list[str]) -> list[list]:
    idx = [table.columns.index(c) for c in columns]
    return [[row[i] for i in idx] for row in table.rows]


def test_figure_answers_and_paths(built, items):
    out, report = built
    paths = set()
    for item in items["figure_qa"]:
        figure = next(s for s in item["question"] if s["type"] == "figure")
        assert not Path(figure["path"]).is_absolute() and figure["path"].startswith("figures/")
        with Image.open(out / figure["path"]) as image:
            assert image.format == "PNG" and image.size == (160, 120)
        paths.add(figure["path"])
        doc = corpus_documents(item["provenance"]["source"])[item["provenance"]["doc_ids"][0]]
        table_seg = next(s for s in doc.segments if s["type"] == "table")
        asked = item["question"][-1]["text"]
        col = re.search(r"bar chart of (.+), which|plotted (.+) reach|is (.+) higher or lower", asked)
        col = next(g for g in col.groups() if g)
        values = np.array([r[table_seg["columns"].index(col)] for r in table_seg["rows"]], dtype=float)
        labels = [f"{table_seg['columns'][0].lower()} {r[0]}" for r in table_seg["rows"]]
        expected = {"fig.bar_max": labels[int(np.argmax(values))], "fig.line_peak": labels[int(np.argmax(values))],
                    "fig.bar_min": labels[int(np.argmin(values))],
                    "fig.line_trend": "higher" if values[-1] > values[0] else "lower"}[item["skill"]]
        assert right(item) == expected, item["id"]
    assert len(paths) == report["figures"] == len(list((out / "figures").glob("*.png")))


def test_element_answers_follow_rdkit_periodic_table(items):
    pt = Chem.GetPeriodicTable()
    for item in items["elements"]:
        z = item["provenance"]["record"]["z"]
        name, symbol = pt.GetElementName(z).lower(), pt.GetElementSymbol(z)
        kind = item["id"].split("-")[2]
        if item["type"] == "short_answer":
            expected = pt.GetAtomicWeight(z) if kind == "weight" else pt.GetMostCommonIsotope(z)
            assert item["answer"] == pytest.approx(expected, rel=1e-5)
        else:
            expected = {"by_number": f"{name} ({symbol})", "number": str(z), "symbol": name,
                        "period": f"period {pt.GetRow(z)}", "isotope": str(pt.GetMostCommonIsotope(z))}.get(kind)
            if kind == "weight":
                assert float(right(item)) == pytest.approx(pt.GetAtomicWeight(z), rel=1e-5)
            else:
                assert right(item) == expected, item["id"]


def test_redefinitions_contradict_the_memorised_value(items):
    pt = Chem.GetPeriodicTable()
    constants = {"pi": sp.pi, "e": sp.E, "phi": sp.GoldenRatio, "tau": 2 * sp.pi}
    for item in items["redefine"]:
        assert item["answer"] != item["memorised"], item["id"]
        text, memorised = item["question"][0]["text"], item["choices"][item["memorised"]].strip()
        if item["skill"] == "redefine.constant":
            name, value = re.match(r"\w+ (\w+) (?:as|be|equals) (\d+)\.", text).groups()
            true_value = float(constants[name])
            if "first digit" in text:
                assert right(item) == value[0] and memorised == str(true_value)[0]
            else:
                assert int(right(item)) == int(value) + 1 and float(memorised) == pytest.approx(true_value + 1, 1e-5)
        elif item["skill"] == "redefine.element":
            z = item["provenance"]["record"]["z"]
            if "have atomic number" in text:
                assert memorised == str(z) and right(item) == re.search(r"atomic number (\d+)\.", text)[1]
            else:
                assert memorised.startswith(pt.GetElementName(z).lower())
                assert right(item) == re.search(r"were called (.+)\. Question", text)[1]
        else:
            codon = item["provenance"]["record"]["codon"]
            aa = CodonTable.unambiguous_dna_by_id[1].forward_table[codon]
            assert memorised.endswith(f"({protein_letters_1to3[aa]}, {aa})")
            assert f"code for {right(item)} in" in text


def test_task_names_load_no_data_libraries():
    code = ("import sys; from scifm.eval.builtin import BUILTIN_TASK_NAMES; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'rdkit', 'sympy', 'matplotlib', 'Bio'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_tasks_are_deterministic_given_the_seed(tmp_path):
    for name in ("codon", "redefine", "elements"):
        runs = [list(BUILTIN_TASKS[name](TaskContext(name, random.Random(f"3:{name}"), tmp_path))) for _ in range(2)]
        assert runs[0] == runs[1]


def test_cached_rebuild_is_a_no_op(built, monkeypatch):
    out, report = built
    from scifm.eval.builtin import build

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    def fail(*args, **kwargs):
        raise AssertionError("an up-to-date task set was rebuilt")

    monkeypatch.setattr(build, "write_tasks", fail)
    assert build_builtin_tasks(out, seed=0) == report
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps
    # another seed, task version or corpus version is not up to date
    assert build.cached_report(out, {"seed": 1}) is None
    monkeypatch.setattr(build, "TASKS_VERSION", report["version"] + 1)
    assert build.cached_report(out, {"seed": 0}) is None


def test_default_tasks_dir_follows_the_cache_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("SCIFM_CACHE", str(tmp_path))
    assert default_tasks_dir() == tmp_path / "eval-tasks-v1"
