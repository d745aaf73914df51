"""Continuation log-likelihoods: batching changes nothing, and the sum is the model's own."""

from __future__ import annotations

import torch

from scifm.eval.loglikelihood import Request, score_continuations
from scifm.model.init import init_parameters
from scifm.model.multimodal import ScientificMoE, vocab_sizes_of

ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"


def requests() -> list[Request]:
    mol = [{"type": "text", "text": "The TPSA of "}, {"type": "molecule", "smiles": ASPIRIN},
           {"type": "text", "text": " is"}]
    return [Request(mol, " 63.6 Å²."), Request(mol, " 12.0 Å²."),
            Request([{"type": "text", "text": "Water boils at"}], " 100 degrees Celsius."),
            Request([{"type": "text", "text": "The codon AUG codes for"}], " methionine.")]


def test_batched_scores_equal_one_at_a_time_and_the_models_own_sum(make_config, tokenizer):
    cfg = make_config()
    model = ScientificMoE(cfg.model, vocab_sizes_of(tokenizer))
    init_parameters(model, 0, cfg.model.init_std, cfg.model.n_layers)
    reqs = requests()
    batched = score_continuations(model, tokenizer, cfg.model.encoders, reqs, seq_len=128, batch_size=4)
    alone = [score_continuations(model, tokenizer, cfg.model.encoders, [r], seq_len=128)[0] for r in reqs]
    for a, b in zip(batched, alone):
        assert abs(a.logprob - b.logprob) < 1e-4 and a.n_tokens == b.n_tokens
    # the text-only request by hand: full forward, log-softmax, the continuation's tokens
    ctx = [tokenizer.bos_id, *tokenizer.encode_text("Water boils at")]
    cont = tokenizer.encode_text(" 100 degrees Celsius.")
    ids = torch.tensor([ctx + cont])
    n = ids.shape[1] - 1
    with torch.no_grad():
        logits = model(ids[:, :-1], torch.arange(n)[None], torch.zeros(1, n, dtype=torch.long), {}, {})
    logp = torch.log_softmax(logits[0], -1)[torch.arange(len(ctx) - 1, n), torch.tensor(cont)].sum()
    assert abs(float(logp) - batched[2].logprob) < 1e-4 and batched[2].n_tokens == len(cont)
    # the molecule reaches the score: the same continuation without the molecule scores differently
    no_mol = score_continuations(model, tokenizer, cfg.model.encoders,
                                 [Request([{"type": "text", "text": "The TPSA of  is"}], " 63.6 Å².")], seq_len=128)
    assert abs(no_mol[0].logprob - batched[0].logprob) > 1e-4
