"""ScientificTokenizer on real data shipped in pip packages: RDKit's NCI SMILES, a pyhmmer proteome,
SymPy's LaTeX parser cases and SymPy docstrings as prose."""

from __future__ import annotations

import importlib.resources
import json
import random
import time
from pathlib import Path

import pytest
import sympy
import torch
from Bio import SeqIO
from sympy.parsing.tests import test_latex

from scifm.core.modalities import MODALITIES
from scifm.core.errors import ScifmError
from scifm.tokenizers import DOMAINS, DomainVocab, ScientificTokenizer

ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"
N_DOCS = 10_000


def _nci_smiles() -> list[str]:
    path = importlib.resources.files("rdkit") / "Data" / "NCI" / "first_5K.smi"
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def _proteins() -> list[str]:
    path = importlib.resources.files("pyhmmer") / "tests" / "data" / "seqs" / "938293.PRJEB85.HG003687.faa"
    with path.open() as handle:
        return [str(record.seq) for record in SeqIO.parse(handle, "fasta")]


def _latex() -> list[str]:
    return [latex for latex, _ in test_latex.GOOD_PAIRS] + list(test_latex.BAD_STRINGS)


def _prose() -> list[str]:
    docs = (getattr(obj, "__doc__", None) for obj in vars(sympy).values())
    return [p.strip() for d in docs if isinstance(d, str) for p in d.split("\n\n") if p.strip()]


SMILES, PROTEINS, LATEX, PROSE = _nci_smiles(), _proteins(), _latex(), _prose()


def _mixed_docs(n: int, seed: int = 0) -> list[str]:
    """Prose paragraphs with real molecules, proteins and formulas inline, tagged and untagged."""
    rng = random.Random(seed)
    templates = [
        "{p} The SMILES {s} has a ring.",
        "{p} <smiles>{s}</smiles>",
        "{p} Sequence: {q}.",
        "{p} <protein>{q}</protein>",
        "{p} We have ${l}$ here, and $${l}$$.",
        "{p} <latex>{l}</latex>",
        "{p}",
    ]
    return [
        rng.choice(templates).format(
            p=rng.choice(PROSE)[:400], s=rng.choice(SMILES), q=rng.choice(PROTEINS)[:120], l=rng.choice(LATEX)
        )
        for _ in range(n)
    ]


@pytest.fixture(scope="session")
def trained() -> tuple[ScientificTokenizer, float]:
    start = time.perf_counter()
    tok = ScientificTokenizer.train(_mixed_docs(N_DOCS), vocab_size=4096, smiles=SMILES[:1000], latex=LATEX)
    return tok, time.perf_counter() - start


@pytest.fixture(scope="session")
def tok(trained: tuple[ScientificTokenizer, float]) -> ScientificTokenizer:
    return trained[0]


def _block(tok: ScientificTokenizer, name: str) -> range:
    start = tok.domain_offset(name)
    return range(start, start + tok.domain(name).size)


def test_training_on_10k_docs_is_fast(trained: tuple[ScientificTokenizer, float]) -> None:
    assert trained[1] < 15.0


def test_id_layout_is_contiguous(tok: ScientificTokenizer) -> None:
    end = tok.text_vocab_size
    for name in DOMAINS:
        assert tok.domain_offset(name) == end
        end += tok.domain(name).size
    assert end == tok.vocab_size
    assert tok.text_vocab_size <= 4096 + 64  # BPE target plus the special tokens


def test_nci_smiles_round_trip(tok: ScientificTokenizer) -> None:
    block = _block(tok, "smiles")
    for s in SMILES:
        ids = tok.encode_domain("smiles", s)
        assert all(i in block for i in ids)
        assert tok.decode(ids) == s
        assert tok.decode(tok.encode_text(f"<smiles>{s}</smiles>")) == f"<smiles>{s}</smiles>"


def test_proteins_round_trip(tok: ScientificTokenizer) -> None:
    block = _block(tok, "protein")
    for q in PROTEINS:
        ids = tok.encode_domain("protein", q)
        assert all(i in block for i in ids)
        assert tok.decode(ids) == q
        assert tok.decode(tok.encode_text(f"The protein {q} folds.")) == f"The protein {q} folds."


def test_latex_round_trip(tok: ScientificTokenizer) -> None:
    block = _block(tok, "latex")
    for latex in LATEX:
        ids = tok.encode_domain("latex", latex)
        assert all(i in block for i in ids)
        assert tok.decode(ids) == latex
        for text in (f"so ${latex}$ holds", f"$${latex}$$", f"<latex>{latex}</latex>"):
            assert tok.decode(tok.encode_text(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "   \n\t  \r\n  ",
        f"The SMILES {ASPIRIN} has 13 heavy atoms.",
        f"Aspirin ({ASPIRIN}), then {ASPIRIN}.",
        "<latex>\\frac{a}{b}</latex>",
        "<smiles></smiles><protein></protein>",
        "unclosed <smiles>CCO and </latex> stray",
        "Ångström – μ and 日本語 😀 \x00\x7f",
        "costs $5 and $10, but $x^2$ and $$\\sum_i x_i$$ are math; \\$ is escaped $",
        "[PAD] [START_MOLECULE] [SLOT_TABLE] <smiles> $ literal marker names",
        "  leading and trailing spaces  ",
    ],
)
def test_prose_round_trip(tok: ScientificTokenizer, text: str) -> None:
    assert tok.decode(tok.encode_text(text)) == text


def test_real_mixed_documents_round_trip(tok: ScientificTokenizer) -> None:
    for text in _mixed_docs(500, seed=1):
        assert tok.decode(tok.encode_text(text)) == text


def test_random_strings_round_trip(tok: ScientificTokenizer) -> None:
    rng = random.Random(2)
    pool = ["<smiles>", "</smiles>", "<latex>", "</latex>", "<protein>", "$", "$$", " ", "\n", "é", "𝛼"]
    pool += ["\\frac", ASPIRIN, PROTEINS[0][:40], "word", "[EOS]", "\\", "{", "."]
    for _ in range(300):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(0, 12)))
        assert tok.decode(tok.encode_text(text)) == text


def test_inline_smiles_uses_smiles_ids(tok: ScientificTokenizer) -> None:
    ids = tok.encode_text(f"The SMILES {ASPIRIN}. has a ring")
    smiles_ids = [i for i in ids if i in _block(tok, "smiles")]
    assert smiles_ids == tok.encode_domain("smiles", ASPIRIN)  # the trailing "." stays prose
    prose_ids = tok.encode_text("Cocoa, cocaine and Coca Cola")
    assert all(i < tok.text_vocab_size for i in prose_ids)
    assert not set(prose_ids) & set(smiles_ids)


# "CCCCCCCCCCCC" parses (dodecane) but is one alphabetic word: pure words are never SMILES.
@pytest.mark.parametrize(
    "word", ["CCCCCCCCCCCC", "1234567890", "3.14159265358", "Cyclohexanone", "well-known"]
)
def test_words_and_numbers_are_not_smiles(tok: ScientificTokenizer, word: str) -> None:
    assert all(i < tok.text_vocab_size for i in tok.encode_text(f"see {word} here"))


def test_protein_run_detection(tok: ScientificTokenizer) -> None:
    run = PROTEINS[0][:30]
    ids = tok.encode_text(f"The chain {run} binds.")
    assert [i for i in ids if i in _block(tok, "protein")] == tok.encode_domain("protein", run)
    assert all(i < tok.text_vocab_size for i in tok.encode_text("The word HELLOWORLD is shouted."))


def test_tags_are_special_tokens(tok: ScientificTokenizer) -> None:
    ids = tok.encode_text("<latex>\\frac{a}{b}</latex>")
    inner = tok.encode_domain("latex", "\\frac{a}{b}")
    assert ids[1:-1] == inner and len(ids) == len(inner) + 2
    assert tok.decode(ids[:1]) == "<latex>" and tok.decode(ids[-1:]) == "</latex>"
    assert inner[0] == tok.domain_offset("latex") + tok.domain("latex").encode("\\frac")[0]


def test_learned_and_fallback_domain_tokens(tok: ScientificTokenizer) -> None:
    smiles = tok.domain("smiles")
    assert len(smiles.encode("[C@@H]")) == 1
    assert smiles.encode("[Xe+7]") == [i for c in "[Xe+7]" for i in smiles.encode(c)]
    latex = tok.domain("latex")
    assert len(latex.encode("\\thinspace")) == 1  # seen in SymPy's LaTeX cases
    assert len(latex.encode("\\notacommand")) == len("\\notacommand")
    assert latex.decode(latex.encode("µ∑")) == "µ∑"


def test_domain_vocab_dict_round_trip(tok: ScientificTokenizer) -> None:
    for name in DOMAINS:
        vocab = tok.domain(name)
        again = DomainVocab.from_dict(json.loads(json.dumps(vocab.to_dict())))
        assert (again.name, again.size) == (name, vocab.size)
        assert again.encode(ASPIRIN + " \\alpha é") == vocab.encode(ASPIRIN + " \\alpha é")


def test_save_load_round_trip(tok: ScientificTokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["domains.json", "tokenizer.json"]
    again = ScientificTokenizer.load(tmp_path / "tok")
    sizes = (tok.vocab_size, tok.text_vocab_size, tok.pad_id)
    assert (again.vocab_size, again.text_vocab_size, again.pad_id) == sizes
    for text in _mixed_docs(200, seed=3):
        assert again.encode_text(text) == tok.encode_text(text)
    assert [again.slot_id(m) for m in MODALITIES] == [tok.slot_id(m) for m in MODALITIES]


def test_markers_are_distinct_and_in_range(tok: ScientificTokenizer) -> None:
    markers = [f(m) for m in MODALITIES for f in (tok.start_id, tok.end_id, tok.slot_id)]
    special = markers + [tok.pad_id, tok.bos_id, tok.eos_id]
    assert len(set(special)) == len(special)
    assert all(0 <= i < tok.text_vocab_size for i in special)
    assert tok.decode([tok.start_id("molecule"), tok.slot_id("molecule"), tok.end_id("molecule")]) == (
        "[START_MOLECULE][SLOT_MOLECULE][END_MOLECULE]"
    )


def test_loss_target_mask(tok: ScientificTokenizer) -> None:
    text = tok.encode_text(f"The SMILES {ASPIRIN} and $x^2$ end.")
    frame = [tok.start_id("protein"), tok.slot_id("protein"), tok.slot_id("protein"), tok.end_id("protein")]
    ids = [tok.bos_id, *text, *frame, tok.eos_id, tok.pad_id, tok.pad_id]
    expected = [False] + [True] * len(text) + [False] * len(frame) + [True, False, False]
    mask = tok.loss_target_mask(torch.tensor([ids, ids]))
    assert mask.dtype == torch.bool and mask.shape == (2, len(ids))
    assert mask[0].tolist() == expected and mask[1].tolist() == expected


def test_missing_or_corrupt_directory_raises(tok: ScientificTokenizer, tmp_path: Path) -> None:
    with pytest.raises(ScifmError, match="not found"):
        ScientificTokenizer.load(tmp_path / "nowhere")
    tok.save(tmp_path / "bad")
    (tmp_path / "bad" / "domains.json").write_text("{not json")
    with pytest.raises(ScifmError, match="corrupt"):
        ScientificTokenizer.load(tmp_path / "bad")
    tok.save(tmp_path / "bad")
    (tmp_path / "bad" / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(ScifmError, match="corrupt"):
        ScientificTokenizer.load(tmp_path / "bad")


def test_every_segment_of_the_built_corpus_round_trips(corpus_dir, tokenizer) -> None:
    """The run's own tokenizer, trained on the built-in corpus, is lossless on all of it."""
    from scifm.data.documents import iter_lines, jsonl_files, parse_line

    n_checked = 0
    for _, _, line in iter_lines(jsonl_files(corpus_dir)):
        for seg in parse_line(line).segments:
            kind = seg["type"]
            if kind == "text":
                assert tokenizer.decode(tokenizer.encode_text(seg["text"])) == seg["text"]
            elif kind in ("molecule", "protein", "latex"):
                domain, key = {"molecule": ("smiles", "smiles"), "protein": ("protein", "sequence"),
                               "latex": ("latex", "latex")}[kind]
                vocab = tokenizer.domain(domain)
                assert vocab.decode(vocab.encode(seg[key])) == seg[key]
            else:
                continue
            n_checked += 1
    assert n_checked > 1000
