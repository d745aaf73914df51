"""Hugging Face interop, judged by transformers itself: tiny random Qwen3-MoE and GLM-4.5-MoE models
built by transformers (offline) are imported with model.init_from, trained, exported with
`scifm export hf` and reloaded with AutoModelForCausalLM.

Tolerance: logits to 1e-5 absolute in fp32. The two implementations run the same operations but
not always in the same order (transformers sums an expert's contributions token by token, scifm
per expert; GLM orders its top-k differently), which moves single fp32 roundings (~1e-7 on logits
of size ~1); 1e-5 is two orders above that and far below any real mismatch (a wrong norm, RoPE
layout or routing scale moves logits by 1e-2 or more).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from tests.helpers.hf_models import MODEL_VOCAB, PROSE, build_hf_model
from tests.helpers.torchrun import train_under_torchrun
from scifm.core.errors import ConfigError
from scifm.hf.architectures import architecture_for, model_config_from_hf
from scifm.hf.pretrained import exported_tokenizer, load_pretrained, pretrained_model_config, pretrained_prose
from scifm.hf.tokenizer_files import domain_tag, hf_tokenizer_json, special_spelling
from scifm.model.config import ModelConfig
from scifm.model.init import init_parameters
from scifm.model.multimodal import ScientificMoE, vocab_sizes_of
from scifm.tokenizers import ScientificTokenizer

transformers = pytest.importorskip("transformers")

ARCHS = ["qwen3_moe", "glm4_moe"]
TOL = dict(atol=1e-5, rtol=0)
TEXT = "The enzyme binds water at the active site."


@pytest.fixture(scope="module", params=ARCHS)
def hf_source(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, build_hf_model(request.param, tmp_path_factory.mktemp(request.param))


def scifm_logits(model: ScientificMoE, ids_BS: torch.Tensor) -> torch.Tensor:
    B, S = ids_BS.shape
    positions_BS = torch.arange(S).expand(B, S)
    with torch.no_grad():
        return model.eval()(ids_BS, positions_BS, torch.zeros(B, S, dtype=torch.long))


def _imported_logits_match(hf_dir: Path) -> None:
    cfg = pretrained_model_config(ModelConfig(init_from=f"hf:{hf_dir}"))
    tokenizer = ScientificTokenizer.train(PROSE, pretrained=pretrained_prose(hf_dir))
    # scifm's own ids follow the model's whole vocabulary, reserved ids included
    assert tokenizer.text_ids == MODEL_VOCAB and tokenizer.bos_id >= MODEL_VOCAB
    model = ScientificMoE(cfg, vocab_sizes_of(tokenizer))
    init_parameters(model, 0, cfg.init_std, cfg.n_layers)
    assert "tensors copied" in load_pretrained(model, hf_dir)
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()

    rows = [tokenizer.encode_text(TEXT), tokenizer.encode_text(PROSE[1] + " " + PROSE[2])]
    ids_BS = torch.tensor([r[:10] for r in rows])
    with torch.no_grad():
        expected = reference(ids_BS).logits
    got = scifm_logits(model, ids_BS)[..., :MODEL_VOCAB]
    assert expected.abs().max() > 0.1  # logits large enough that a wrong layer would show
    torch.testing.assert_close(got, expected, **TOL)


def test_imported_model_gives_the_logits_of_transformers(hf_source):
    _imported_logits_match(hf_source[1])


@pytest.mark.parametrize("arch, overrides", [
    # linear RoPE scaling, tied embeddings, biases on every attention projection
    ("qwen3_moe", dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5},
                       tie_word_embeddings=True, attention_bias=True, norm_topk_prob=False)),
    # whole-head RoPE, no q/k norms, no shared expert, no groups, plain top-k weights
    ("glm4_moe", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.0},
                      use_qk_norm=False, n_shared_experts=0, n_group=1, norm_topk_prob=False)),
])
def test_imported_variants_give_the_logits_of_transformers(tmp_path, arch, overrides):
    _imported_logits_match(build_hf_model(arch, tmp_path, **overrides))


def _train_imported(make_config, hf_dir: Path, run_dir: Path, *overrides: str) -> Path:
    from scifm.train.trainer import train

    train(make_config(f"model.init_from=hf:{hf_dir}", "data.seq_len=64", "trainer.batch_size=2",
                      "trainer.val_every=100", *overrides), run_dir)
    return run_dir / "checkpoints"


@pytest.mark.slow
def test_train_export_and_reload_in_transformers(hf_source, make_config, tmp_path):
    from scifm.data.documents import Document
    from scifm.data.encode import encode_document
    from scifm.eval.generate import generate_greedy_ids
    from scifm.train.export import load_checkpoint_model
    from test_train import run_cli

    arch, hf_dir = hf_source
    ckpt = _train_imported(make_config, hf_dir, tmp_path / "run", "trainer.max_steps=3") / "step_3"
    out = run_cli("export", "hf", str(ckpt), "--out", str(tmp_path / "export"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"({arch};" in out.stdout
    export = tmp_path / "export"
    umask = os.umask(0)
    os.umask(umask)
    # readable by others as the umask allows (a serving account, a shared directory), shards included
    assert {p.stat().st_mode & 0o777 for p in export.rglob("*.safetensors")} == {0o666 & ~umask}
    assert export.stat().st_mode & 0o777 == 0o777 & ~umask

    model, tokenizer, cfg = load_checkpoint_model(ckpt)
    source = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    trained = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    assert trained.config.model_type == arch
    # training moved the imported weights: the export is the trained model, not the source
    assert not torch.equal(trained.model.layers[0].self_attn.q_proj.weight, source.model.layers[0].self_attn.q_proj.weight)

    prompt = encode_document(Document("t", "t", "t", [{"type": "text", "text": TEXT}]), tokenizer,
                             cfg.model.encoders, tmp_path).ids[:-1]  # [BOS] + text, no [EOS]
    ids_BS = torch.tensor([prompt])
    with torch.no_grad():
        torch.testing.assert_close(trained(ids_BS).logits, scifm_logits(model, ids_BS), **TOL)
        hf_tokens = trained.generate(ids_BS, max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
    ours = generate_greedy_ids(model, tokenizer, cfg.model.encoders, [[{"type": "text", "text": TEXT}]],
                               max_new_tokens=12, seq_len=cfg.data.seq_len, stop=())[0]
    assert hf_tokens[: len(ours)] == ours and len(ours) > 0
    assert hf_tokens[len(ours):] in ([], [tokenizer.eos_id])  # scifm leaves the [EOS] out

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    for text in PROSE[:4] + [TEXT]:
        assert hf_tokenizer(text, add_special_tokens=False).input_ids == tokenizer.encode_text(text)
    # scifm's encoders and tokenizer travel beside the transformers files: init_from the export
    # rebuilds the whole multimodal model, every tensor equal
    again_cfg = pretrained_model_config(dataclasses.replace(cfg.model, init_from=f"hf:{export}"))
    again_tokenizer = exported_tokenizer(export)
    again = ScientificMoE(again_cfg, vocab_sizes_of(again_tokenizer))
    assert load_pretrained(again, export).endswith(f"encoders from {export}/scifm/encoders.safetensors")
    expected_state = model.state_dict()
    assert all(torch.equal(t, expected_state[k]) for k, t in again.state_dict().items())
    assert again_tokenizer.encode_text(TEXT) == tokenizer.encode_text(TEXT)

    # bf16, in several shards: every tensor bf16 but GLM's routing bias, logits to bf16 precision
    small = run_cli("export", "hf", str(ckpt), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16",
                    "--max-shard-gb", "0.0002", cwd=tmp_path)
    assert small.returncode == 0, small.stderr
    index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    from safetensors import safe_open

    for file in set(index["weight_map"].values()):
        with safe_open(str(tmp_path / "bf16" / file), "pt") as f:
            for name in f.keys():
                want = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
                assert f.get_tensor(name).dtype == want, name
    half = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        half_logits = half(ids_BS).logits.float()
    # bf16 keeps 8 significant bits: 2**-8 relative per operation, a few percent through 4 blocks
    assert (half_logits - trained(ids_BS).logits).abs().max() < 0.05 * trained(ids_BS).logits.abs().max()


@pytest.mark.slow
def test_export_is_the_same_from_every_parallel_layout(make_config, tmp_path):
    """A checkpoint saved under tp=2 (q/k norms and q/k/v biases sharded over heads) or dp_shard=2 ep=2
    (routed and shared experts placed apart) exports to the same files, byte for byte, as the
    single-process one (GLM). max_steps=0 saves the imported weights as step_0, so every layout holds
    the same values. That a checkpoint of every other layout loads into one process with exactly that
    layout's weights is the parity test's reshard check (tests/test_parallel_parity.py); export reads
    nothing but those weights."""
    from scifm.train.export import export_hf

    hf_dir = build_hf_model("glm4_moe", tmp_path / "source")
    common = [f"data.corpus_dir={make_config().data.corpus_dir}", "data.corpus_max_docs_per_source=150",
              "experiment=tiny", f"model.init_from=hf:{hf_dir}", "trainer.max_steps=0", "data.seq_len=64",
              "trainer.batch_size=2"]
    single = _train_imported(make_config, hf_dir, tmp_path / "single", "trainer.max_steps=0") / "step_0"
    export_hf(single, tmp_path / "export-single")
    reference = _files(tmp_path / "export-single")
    for i, layout in enumerate((["parallel.tp=2"], ["parallel.dp_shard=2", "parallel.ep=2"])):
        run_dir = tmp_path / f"layout{i}"
        train_under_torchrun(2, run_dir, *common, *layout)
        export_hf(run_dir / "checkpoints" / "step_0", run_dir / "export")
        assert _files(run_dir / "export") == reference, layout


def _files(export: Path) -> dict[str, bytes]:
    # the run config records the layout; everything else must be identical
    return {str(p.relative_to(export)): p.read_bytes() for p in sorted(export.rglob("*"))
            if p.is_file() and p.name != "config.yaml"}


def test_tokenizer_json_encodes_like_scifm(tokenizer):
    from tokenizers import Tokenizer

    exported = Tokenizer.from_str(hf_tokenizer_json(tokenizer))
    for text in PROSE[:4] + ["Mixed spacing\tand  unicode: Ångström, 5 µm, naïve."]:
        assert exported.encode(text, add_special_tokens=False).ids == tokenizer.encode_text(text)
    for k, special in enumerate(tokenizer.special_tokens):
        assert exported.token_to_id(special_spelling(tokenizer, special)) == tokenizer.text_ids + k
    assert special_spelling(tokenizer, "$") == "<|scifm:$|>"  # `$` is also a prose byte token
    assert exported.token_to_id("[EOS]") == tokenizer.eos_id
    smiles = tokenizer.domain("smiles")
    assert exported.token_to_id(domain_tag("smiles", smiles.tokens[3])) == tokenizer.domain_offset("smiles") + 3
    last = tokenizer.vocab_size - 1  # the latex domain's last byte-fallback token
    assert exported.token_to_id(domain_tag("latex", byte=255)) == last


BAD_HF = [
    ({"model_type": "llama"}, "model_type='llama'"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "rope_type='yarn'"),
    ({"mlp_only_layers": [1]}, "mlp_only_layers"),
    ({"hidden_act": "gelu"}, "hidden_act"),
]


@pytest.mark.parametrize("change, key", BAD_HF)
def test_unsupported_checkpoints_are_refused_naming_the_key(tmp_path, change, key):
    hf = json.loads((build_hf_model("qwen3_moe", tmp_path) / "config.json").read_text()) | change
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("(", r"\(")):
        model_config_from_hf(hf, ModelConfig(), "config.json")


@pytest.mark.parametrize("fields, key", [
    ({}, "model.qk_norm"),  # the tiny model: softmax routing without q/k norms
    ({"qk_norm": True}, "model.moe.n_shared_experts"),
    ({"qk_norm": True, "moe": {"n_shared_experts": 0, "route_scale": 2.0}}, "model.moe.route_scale"),
    ({"attention_bias": "all", "moe": {"score_func": "sigmoid"}}, "model.attention_bias"),
])
def test_models_no_architecture_computes_are_refused_naming_the_key(fields, key):
    from scifm.model.config import MoEConfig

    moe = MoEConfig(**({"n_shared_experts": 1} | fields.pop("moe", {})))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        architecture_for(ModelConfig(moe=moe, **fields), expert_bias_used=False)


def test_init_from_a_missing_directory_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.init_from: .* is not a directory"):
        pretrained_model_config(ModelConfig(init_from=f"hf:{tmp_path / 'nowhere'}"))
    with pytest.raises(ConfigError, match=r"model\.init_from: .*config\.json not found"):
        pretrained_model_config(ModelConfig(init_from=f"hf:{tmp_path}"))


def test_exporting_the_demo_model_says_which_key_rules_it_out(demo_run, tmp_path):
    from test_train import run_cli

    run_dir, _ = demo_run
    ckpt = sorted((run_dir / "checkpoints").iterdir())[-1]
    out = run_cli("export", "hf", str(ckpt), "--out", str(tmp_path / "export"), cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]  # one line, no traceback
    assert out.stderr.startswith("scifm: error: model.qk_norm: false (qwen3_moe always normalises q and k)")
    assert not (tmp_path / "export").exists()
