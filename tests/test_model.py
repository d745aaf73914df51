"""The whole multimodal model: splice at slots, packed == alone, init, meta-device counts."""

from __future__ import annotations

from pathlib import Path

import torch

from scifm.data.documents import Document
from scifm.data.encode import encode_document
from scifm.data.packing import placeholder_features, Row, chunk_document, collate_rows
from scifm.model.init import init_parameters
from scifm.model.multimodal import ScientificMoE, vocab_sizes_of
from scifm.model.transformer import count_params

ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"
CAFFEINE = "Cn1cnc2c1c(=O)n(C)c(=O)n2C"


def build(cfg, tokenizer, seed=0) -> ScientificMoE:
    model = ScientificMoE(cfg.model, vocab_sizes_of(tokenizer))
    init_parameters(model, seed, cfg.model.init_std, cfg.model.n_layers)
    return model.eval()


def batch_of(docs, tokenizer, cfg, seq_len=128):
    rows = []
    for group in docs:
        row = Row([chunk_document(encode_document(d, tokenizer, cfg.model.encoders, Path(".")), seq_len)[0]
                   for d in group])
        rows.append(row)
    return collate_rows(rows, seq_len, tokenizer, placeholder_features(tokenizer, cfg.model.encoders))


def logits(model, batch):
    with torch.no_grad():
        return model(batch.input_ids, **batch.model_kwargs())


def mol_doc(doc_id, smiles):
    return Document(doc_id, "s", "mol.tpsa", [{"type": "text", "text": "The TPSA of "},
                                               {"type": "molecule", "smiles": smiles},
                                               {"type": "text", "text": " is 63.6."}])


def test_document_logits_equal_packed_or_alone(make_config, tokenizer):
    cfg = make_config()
    model = build(cfg, tokenizer)
    a = mol_doc("a", ASPIRIN)
    b = Document("b", "s", "prose", [{"type": "text", "text": "Water boils at 100 degrees Celsius."}])
    alone = batch_of([[a]], tokenizer, cfg)
    packed = batch_of([[b, a]], tokenizer, cfg)
    n_a = int((alone.doc_ids[0] == 0).sum())
    off = int((packed.doc_ids[0] == 0).sum())
    torch.testing.assert_close(logits(model, packed)[0, off : off + n_a], logits(model, alone)[0, :n_a],
                               rtol=1e-5, atol=1e-5)


def test_encoder_output_enters_at_the_slots_only(make_config, tokenizer):
    cfg = make_config()
    model = build(cfg, tokenizer)
    out_a = logits(model, batch_of([[mol_doc("a", ASPIRIN)]], tokenizer, cfg))[0]
    out_c = logits(model, batch_of([[mol_doc("a", CAFFEINE)]], tokenizer, cfg))[0]
    batch = batch_of([[mol_doc("a", ASPIRIN)]], tokenizer, cfg)
    first_slot = int(batch.slot_index["molecule"][0, 0])
    # causal: positions before the first slot cannot see the molecule; positions after it do
    torch.testing.assert_close(out_a[:first_slot], out_c[:first_slot])
    assert (out_a[first_slot:] - out_c[first_slot:]).abs().max() > 1e-4


def test_molecule_encoder_gets_gradient_from_the_lm_loss(make_config, tokenizer):
    cfg = make_config()
    model = build(cfg, tokenizer).train()
    batch = batch_of([[mol_doc("a", ASPIRIN)]], tokenizer, cfg)
    out = model(batch.input_ids, **batch.model_kwargs())
    torch.nn.functional.cross_entropy(out.flatten(0, 1), batch.labels.flatten(), ignore_index=-100).backward()
    grads = [p.grad for p in model.encoders["molecule"].parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_initialization_depends_only_on_seed_and_name(make_config, tokenizer):
    cfg = make_config()
    a = build(cfg, tokenizer, 7)
    torch.manual_seed(12345)  # the global RNG state must not matter
    torch.randn(1000)
    b, c = build(cfg, tokenizer, 7), build(cfg, tokenizer, 8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    matrices = [k for k in sa if sa[k].ndim >= 2]
    assert all(not torch.equal(sa[k], sc[k]) for k in matrices)


def test_paper_scale_config_counts_about_1t_total_22b_active(make_config):
    from scifm.config import compose_run_config

    cfg = compose_run_config(["model=paper_1t"]).model
    sizes = {"total": cfg.vocab_size, "text": cfg.vocab_size, "latex": 1024, "protein": 32}
    with torch.device("meta"):
        model = ScientificMoE(cfg, sizes)
    total, active = count_params(model, cfg)
    assert 0.85e12 < total < 1.1e12, total  # "~1T"
    assert 18e9 < active < 26e9, active  # "~22B active"


def test_every_encoder_runs_and_gets_a_gradient_even_without_items(make_config, tokenizer):
    """Placeholders keep all encoders in the graph: data-parallel ranks issue the same collectives."""
    cfg = make_config()
    model = build(cfg, tokenizer).train()
    prose = Document("p", "s", "prose", [{"type": "text", "text": "No molecules here."}])
    batch = batch_of([[prose]], tokenizer, cfg)
    assert set(batch.items) == {"latex", "molecule", "protein", "table", "figure"}
    assert all(batch.slot_index[m].shape[0] == 0 for m in batch.items)
    out = model(batch.input_ids, **batch.model_kwargs())
    with torch.no_grad():  # the placeholders write nothing into the sequence
        alone = model(batch.input_ids, batch.positions, batch.doc_ids)
    torch.testing.assert_close(out.detach(), alone, rtol=0, atol=0)
    torch.nn.functional.cross_entropy(out.flatten(0, 1), batch.labels.flatten(), ignore_index=-100).backward()
    for name, p in model.encoders.named_parameters():
        assert p.grad is not None and torch.all(p.grad == 0), name
