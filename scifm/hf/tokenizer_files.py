"""scifm's tokenizer as a Hugging Face `tokenizer.json`, and a pretrained one as scifm's prose BPE.

The exported file keeps the prose tokenizer (its model, normalizer, pre-tokenizer and its own added
tokens) and appends, as added tokens at scifm's ids: fillers for ids the model reserves past the
prose tokenizer, scifm's special tokens, then every domain token spelled as an explicit tag,
`<smiles:Cl>`, `<protein:A>`, `<latex:\\frac>`, and each domain's byte fallback `<smiles:0x41>`.
The tokenizers library numbers added tokens in order from the end of the vocabulary, so the list
must be gap-free, and it gives an added token that spells a prose token (scifm's `$` tag is also the
byte `$`) the prose id: such a token is spelled `<|scifm:$|>` instead. The export checks every id
after building the file.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from scifm.core.errors import ConfigError, first_line
from scifm.tokenizers import ScientificTokenizer
from scifm.tokenizers.domain import DOMAINS
from scifm.tokenizers.specials import BOS, EOS, PAD

TOKENIZER_JSON = "tokenizer.json"


def domain_tag(domain: str, token: str | None = None, byte: int | None = None) -> str:
    return f"<{domain}:{token}>" if byte is None else f"<{domain}:0x{byte:02X}>"


def special_spelling(tok: ScientificTokenizer, special: str) -> str:
    """How a special token is written in the exported tokenizer.json."""
    return special if tok.prose.token_to_id(special) is None else f"<|scifm:{special}|>"


def _added(i: int, content: str, special: bool) -> dict:
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def added_tokens(tok: ScientificTokenizer) -> list[tuple[int, str, bool]]:
    """(id, content, special) for every id past the prose tokenizer's own, in id order."""
    out = [(i, f"<|scifm_reserved_{i}|>", True) for i in range(tok.prose.get_vocab_size(), tok.text_ids)]
    out += [(tok.text_ids + k, special_spelling(tok, s), True) for k, s in enumerate(tok.special_tokens)]
    for name in DOMAINS:
        vocab, offset = tok.domain(name), tok.domain_offset(name)
        tags = [domain_tag(name, t) for t in vocab.tokens] + [domain_tag(name, byte=b) for b in range(256)]
        out += [(offset + k, tag, False) for k, tag in enumerate(tags)]
    return out


def hf_tokenizer_json(tok: ScientificTokenizer) -> str:
    data = json.loads(tok.prose.to_str())
    data["added_tokens"] = list(data.get("added_tokens") or []) + [_added(*t) for t in added_tokens(tok)]
    text = json.dumps(data, ensure_ascii=False)
    built = Tokenizer.from_str(text)
    wrong = [(i, c, built.token_to_id(c)) for i, c, _ in added_tokens(tok) if built.token_to_id(c) != i]
    if wrong:
        i, content, got = wrong[0]
        raise ConfigError(f"tokenizer export: {content!r} got id {got} instead of {i} "
                          f"({len(wrong)} tokens collide with the prose vocabulary)")
    return text


def write_hf_tokenizer(tok: ScientificTokenizer, out: Path, max_len: int) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json for AutoTokenizer."""
    (out / TOKENIZER_JSON).write_text(hf_tokenizer_json(tok), encoding="utf-8")
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
              "clean_up_tokenization_spaces": False, **specials}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=1), encoding="utf-8")


def load_prose_tokenizer(hf_dir: Path, model_vocab: int) -> Tokenizer:
    """A pretrained checkpoint's tokenizer.json, checked to fit in its model's vocabulary."""
    path = hf_dir / TOKENIZER_JSON
    if not path.is_file():
        raise ConfigError(f"model.init_from: {path} not found; save the pretrained tokenizer as a fast "
                          "tokenizer (tokenizer.save_pretrained writes tokenizer.json)")
    try:
        bpe = Tokenizer.from_file(str(path))
    except Exception as err:  # the tokenizers library raises bare Exceptions on bad files
        raise ConfigError(f"model.init_from: {path} is not a tokenizers file "
                          f"({first_line(err)})") from None
    if bpe.get_vocab_size() > model_vocab:
        raise ConfigError(f"model.init_from: {path} has {bpe.get_vocab_size()} tokens but the model's "
                          f"vocab_size is {model_vocab}")
    return bpe
