"""Greedy generation through the KV cache: the cache changes no logit, batching changes no token,
stops are honoured; short answers are scored exactly or numerically, with per-skill slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scifm.data.documents import Document
from scifm.data.encode import EncodedDocument, encode_document
from scifm.data.packing import Chunk, Row, collate_rows, placeholder_features
from scifm.core.errors import DataError
from scifm.eval import generate, short_answer
from scifm.eval.generate import StopMatcher, generate_greedy, generate_greedy_ids
from scifm.eval.scoring import proportion
from scifm.eval.short_answer import evaluate_short_answer
from scifm.eval.tasks import ShortAnswerItem
from scifm.model.attention import Attention
from scifm.model.init import init_parameters
from scifm.model.kv_cache import KVCache, LayerKV
from scifm.model.layers import rope_cos_sin
from scifm.model.multimodal import ScientificMoE, vocab_sizes_of

ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"
MOL_PROMPT = [{"type": "text", "text": "The TPSA of "}, {"type": "molecule", "smiles": ASPIRIN},
              {"type": "text", "text": " is"}]
ATOL = 1e-5


def text(s: str) -> list[dict]:
    return [{"type": "text", "text": s}]


@pytest.fixture(scope="module")
def tiny(make_config, tokenizer):
    cfg = make_config()
    model = ScientificMoE(cfg.model, vocab_sizes_of(tokenizer))
    init_parameters(model, 0, cfg.model.init_std, cfg.model.n_layers)
    return model.eval(), cfg.model.encoders


def prompt_doc(tokenizer, enc, context: list[dict], extra: list[int] = ()) -> EncodedDocument:
    """The context as generate lays it out (no [EOS]), then `extra` ids, then a final [EOS] target."""
    doc = encode_document(Document("t", "t", "t", context), tokenizer, enc, Path("."))
    return EncodedDocument("t", doc.ids[:-1] + list(extra) + [tokenizer.eos_id], doc.items)


def forward(model, tokenizer, enc, doc: EncodedDocument, cache: KVCache | None = None) -> torch.Tensor:
    """Logits [S, V] of one row holding every id of `doc` but the last."""
    n = len(doc.ids) - 1
    batch = collate_rows([Row([Chunk(doc, 0, n)])], n, tokenizer, placeholder_features(tokenizer, enc))
    with torch.no_grad():
        return model(batch.input_ids, **batch.model_kwargs(), cache=cache)[0]


def step(model, ids: list[int], first_pos: int, doc_id: int, cache: KVCache) -> torch.Tensor:
    """Logits [S, V] of tokens continuing the cache, no items."""
    ids_1S = torch.tensor([ids])
    pos_1S = torch.arange(first_pos, first_pos + len(ids))[None]
    with torch.no_grad():
        return model(ids_1S, pos_1S, torch.full_like(ids_1S, doc_id), cache=cache)[0]


def test_cached_decode_logits_equal_one_full_forward(tiny, tokenizer):
    model, enc = tiny
    cont = tokenizer.encode_text(" 63.6 Å² at most.")
    full_SV = forward(model, tokenizer, enc, prompt_doc(tokenizer, enc, MOL_PROMPT, cont))
    prompt = prompt_doc(tokenizer, enc, MOL_PROMPT)
    P = len(prompt.ids) - 1
    cache = KVCache()
    got = [forward(model, tokenizer, enc, prompt, cache)]  # prefill: the molecule enters here only
    got.append(step(model, cont[:3], P, 0, cache))  # a several-token step over a non-empty cache
    got += [step(model, [tok], P + 3 + i, 0, cache) for i, tok in enumerate(cont[3:])]
    assert len(cache) == P + len(cont)
    torch.testing.assert_close(torch.cat(got), full_SV, atol=ATOL, rtol=0)
    # the molecule reached the cached keys: the same text without it predicts differently
    no_mol_SV = forward(model, tokenizer, enc, prompt_doc(tokenizer, enc, text("The TPSA of  is"), cont))
    assert (no_mol_SV[-1] - full_SV[-1]).abs().max() > 1e-3


def test_cached_decode_honours_document_boundaries(tiny, tokenizer):
    model, _ = tiny
    a = [tokenizer.bos_id, *tokenizer.encode_text("Water boils at 100 degrees.")]
    b = [tokenizer.bos_id, *tokenizer.encode_text("The codon AUG codes for methionine.")]
    ids_1S = torch.tensor([a + b])
    pos_1S = torch.cat([torch.arange(len(a)), torch.arange(len(b))])[None]
    docs_1S = torch.tensor([[0] * len(a) + [1] * len(b)])
    with torch.no_grad():
        full_SV = model(ids_1S, pos_1S, docs_1S, {}, {})[0]
        b_alone_SV = model(torch.tensor([b]), torch.arange(len(b))[None], torch.zeros(1, len(b), dtype=torch.long),
                           {}, {})[0]
        one_doc_SV = model(ids_1S, pos_1S, torch.zeros_like(docs_1S), {}, {})[0]
    k = 3  # prefill a and b's first k tokens, then decode the rest of b one token at a time
    cache = KVCache()
    with torch.no_grad():
        got = [model(ids_1S[:, : len(a) + k], pos_1S[:, : len(a) + k], docs_1S[:, : len(a) + k], cache=cache)[0]]
    got += [step(model, [tok], k + i, 1, cache) for i, tok in enumerate(b[k:])]
    got_SV = torch.cat(got)
    torch.testing.assert_close(got_SV, full_SV, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_SV[len(a):], b_alone_SV, atol=ATOL, rtol=0)
    # had b's tokens seen a, the logits would differ: the check above has teeth
    assert (one_doc_SV[len(a):] - b_alone_SV).abs().max() > 1e-3


def test_attention_with_cache_and_no_mask_is_plain_causal():
    torch.manual_seed(0)
    attn = Attention(32, 4, 2, 8)
    x_BSD = torch.randn(2, 7, 32)
    cos, sin = rope_cos_sin(torch.arange(7)[None].expand(2, -1), 8, 10000.0)
    with torch.no_grad():
        full_BSD = attn(x_BSD, cos, sin)
        cache = LayerKV()
        got = [attn(x_BSD[:, a:b], cos[:, a:b], sin[:, a:b], cache=cache) for a, b in [(0, 3), (3, 5), (5, 6), (6, 7)]]
    assert cache.k_BKTD.shape == (2, 2, 7, 8)
    torch.testing.assert_close(torch.cat(got, dim=1), full_BSD, atol=ATOL, rtol=0)


def naive_greedy(model, tokenizer, enc, context: list[dict], max_new: int) -> list[int]:
    """Full recompute of the whole sequence for every new token, no cache."""
    out: list[int] = []
    for _ in range(max_new):
        logits_V = forward(model, tokenizer, enc, prompt_doc(tokenizer, enc, context, out))[-1]
        tok = int(logits_V[: tokenizer.vocab_size].argmax())
        if tok == tokenizer.eos_id:
            break
        out.append(tok)
    return out


def test_cached_greedy_equals_naive_and_batched_equals_alone(tiny, tokenizer):
    model, enc = tiny
    contexts = [MOL_PROMPT, text("Water boils at"), text("The codon AUG codes for the amino acid"), text("Q:")]
    assert len({len(prompt_doc(tokenizer, enc, c).ids) for c in contexts}) == len(contexts)  # all lengths differ
    kw = {"max_new_tokens": 6, "seq_len": 128, "stop": ()}
    batched = generate_greedy_ids(model, tokenizer, enc, contexts, batch_size=4, **kw)
    alone = generate_greedy_ids(model, tokenizer, enc, contexts, batch_size=1, **kw)
    naive = [naive_greedy(model, tokenizer, enc, c, 6) for c in contexts]
    assert batched == naive
    assert alone == naive
    assert sum(map(len, naive)) > 0
    texts = generate_greedy(model, tokenizer, enc, contexts, batch_size=3, **kw)
    assert texts == [tokenizer.decode(ids) for ids in naive]


class ScriptedModel(nn.Module):
    """Predicts script[position] wherever it is asked: an output forced by the test."""

    def __init__(self, script: list[int], vocab: int):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives generate a device to read
        self.script = torch.tensor(script)
        self.vocab = vocab

    def forward(self, x, positions_BS, doc_ids_BS, items=None, slot_index=None, *, cache=None):
        assert cache is not None  # generate decodes through the cache
        return F.one_hot(self.script[positions_BS.clamp(max=len(self.script) - 1)], self.vocab).float()


def scripted(tokenizer, enc, context: list[dict], answer_ids: list[int]) -> tuple[ScriptedModel, int]:
    """A model that answers `context` with answer_ids then [EOS]; and the prompt's length."""
    P = len(prompt_doc(tokenizer, enc, context).ids) - 1
    script = [tokenizer.pad_id] * (P - 1) + answer_ids + [tokenizer.eos_id]
    return ScriptedModel(script, vocab_sizes_of(tokenizer)["total"]), P


def test_stop_strings_max_new_tokens_and_seq_len(tiny, tokenizer):
    _, enc = tiny
    q = text("The melting point is")
    ans = tokenizer.encode_text(" 42 kelvin.\nNext")
    model, P = scripted(tokenizer, enc, q, ans)

    def gen(**kw):
        args = {"max_new_tokens": 64, "seq_len": 128} | kw
        return (generate_greedy(model, tokenizer, enc, [q], **args)[0],
                generate_greedy_ids(model, tokenizer, enc, [q], **args)[0])

    assert gen() == (" 42 kelvin.", ans[: next(k for k in range(len(ans) + 1) if "\n" in tokenizer.decode(ans[:k]))])
    assert gen(stop=()) == (" 42 kelvin.\nNext", ans)  # ended by [EOS], which is not returned
    got, ids = gen(stop=("kel", "."))
    assert got == " 42 " and "kel" in tokenizer.decode(ids) and "kel" not in tokenizer.decode(ids[:-1])
    assert gen(stop=(), max_new_tokens=2) == (tokenizer.decode(ans[:2]), ans[:2])
    # the model's input never passes seq_len: a prompt of P tokens leaves room for 2 more tokens
    assert gen(stop=(), seq_len=P + 1)[1] == ans[:2]
    assert gen(stop=(), seq_len=P)[1] == ans[:1]
    with pytest.raises(DataError, match="sequence length"):
        gen(seq_len=P - 1)


def test_short_answer_scores_exact_and_numeric_per_skill(tiny, tokenizer, monkeypatch):
    _, enc = tiny
    items = [  # (item, forced prediction, correct)
        (ShortAnswerItem("c1", "chem", text("TPSA?"), 63.6, rel_tol=0.01), " 63.2 Å²", True),
        (ShortAnswerItem("c2", "chem", text("TPSA?"), 63.6, rel_tol=0.001), " 63.2 Å²", False),
        (ShortAnswerItem("b1", "bio", text("AUG?"), "methionine"), " Methionine.", True),
        (ShortAnswerItem("b2", "bio", text("AUG?"), "methionine"), " valine", False),
        (ShortAnswerItem("b3", "bio", text("CUU?"), "leucine"), "leucine", True),
        (ShortAnswerItem("p1", "phys", text("Boils?"), 1000, abs_tol=0.5), " about 1,000.2 K", True),
        (ShortAnswerItem("p2", "phys", text("Boils?"), 100), " no idea", False),
    ]
    seen = {}

    def fake_generate(model, tok, enc_cfg, contexts, **kw):
        seen.update(contexts=contexts, **kw)
        return [pred for _, pred, _ in items]

    monkeypatch.setattr(short_answer, "generate_greedy", fake_generate)
    out = evaluate_short_answer(None, tokenizer, enc, [i for i, _, _ in items], seq_len=64, max_new_tokens=5)
    assert seen["contexts"] == [i.question for i, _, _ in items]
    assert seen["max_new_tokens"] == 5 and seen["seq_len"] == 64
    assert out["scores"]["acc"] == proportion(np.array([1, 0, 1, 0, 1, 1, 0.0])).as_dict()
    assert out["scores"]["acc"]["value"] == pytest.approx(4 / 7) and out["scores"]["acc"]["n"] == 7
    assert {s: (v["value"], v["n"]) for s, v in out["by_skill"].items()} == {
        "bio": (pytest.approx(2 / 3), 3), "chem": (0.5, 2), "phys": (0.5, 2)}
    assert [s["correct"] for s in out["samples"]] == [c for _, _, c in items]
    assert out["samples"][2] == {"id": "b1", "skill": "bio", "prediction": " Methionine.",
                                 "target": "methionine", "correct": True}


def test_short_answer_end_to_end_on_a_forced_model(tiny, tokenizer):
    _, enc = tiny
    q = text("The melting point is")
    model, _ = scripted(tokenizer, enc, q, tokenizer.encode_text(" 42 kelvin.\nNext"))
    items = [ShortAnswerItem("n", "phys", q, 42.0, abs_tol=0.5), ShortAnswerItem("s", "phys", q, "42 kelvin"),
             ShortAnswerItem("w", "phys", q, 43)]
    out = evaluate_short_answer(model, tokenizer, enc, items, seq_len=64, batch_size=2)
    assert [s["prediction"] for s in out["samples"]] == [" 42 kelvin."] * 3
    assert [s["correct"] for s in out["samples"]] == [True, True, False]
    assert out["by_skill"]["phys"]["value"] == pytest.approx(2 / 3)


class FullDecodeStop:
    """The stop check before StopMatcher, the reference: decode all of a row's ids at every step."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop, self.ids = tokenizer, stop, []

    def add(self, token: int) -> bool:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        return any(s in text for s in self.stop)


def first_stop(matcher, ids: list[int]) -> int | None:
    return next((k for k, tok in enumerate(ids) if matcher.add(tok)), None)


def test_incremental_stop_check_equals_full_decode(tokenizer):
    # characters this tokenizer splits into byte tokens (ï, é, →, 🧪: each token decodes to U+FFFD
    # alone), a molecule and LaTeX in their own vocabularies, newlines that are tokens of their own
    texts = [" 42 kelvin.\nNext", "naïve café → 🧪 Å²\n\nend", "x <smiles>CCO</smiles> $\\alpha^2$ end."]
    cases = 0
    split = 0  # stops found that no single token's text holds: the incremental check must join tokens
    for text in texts:
        ids = tokenizer.encode_text(text)
        pieces = [tokenizer.decode([i]) for i in ids]
        full = tokenizer.decode(ids)
        substrings = {full[a : a + n] for n in range(1, 5) for a in range(len(full) - n + 1)}
        for stop in [(s,) for s in sorted(substrings)] + [("\ufffd",), ("",), ("é", "\n\n"), ("zz", "end")]:
            want = first_stop(FullDecodeStop(tokenizer, stop), ids)
            assert first_stop(StopMatcher(tokenizer, stop), ids) == want, (text, stop)
            cases += 1
            split += want is not None and not any(s in p for s in stop for p in pieces)
    assert cases > 150 and split > 50


def test_generation_with_stops_equals_the_full_decode_rule(tiny, tokenizer, monkeypatch):
    model, enc = tiny
    contexts = [MOL_PROMPT, text("Water boils at"), text("The codon AUG codes for the amino acid"), text("Q:")]
    kw = {"max_new_tokens": 8, "seq_len": 128, "batch_size": 4}
    free = generate_greedy_ids(model, tokenizer, enc, contexts, stop=(), **kw)
    # per row, the two characters around the boundary of its 5th and 6th tokens: stops split across
    # tokens, each ending some row where the full decode ends it (the texts follow from the ids)
    stop = []
    for ids in free:
        head, longer = tokenizer.decode(ids[:5]), tokenizer.decode(ids[:6])
        stop.append(head[-1] + longer[len(head)])
    got = generate_greedy_ids(model, tokenizer, enc, contexts, stop=tuple(stop), **kw)
    monkeypatch.setattr(generate, "StopMatcher", FullDecodeStop)
    assert got == generate_greedy_ids(model, tokenizer, enc, contexts, stop=tuple(stop), **kw)
    assert sum(map(len, got)) < sum(map(len, free))  # the stops cut rows short
