"""The prose tokenizer: byte-level BPE from HF `tokenizers`, lossless for any string."""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BYTE_ALPHABET_SIZE = 256


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train on prose only; scifm's special tokens get their own ids after this vocabulary."""
    bpe = Tokenizer(models.BPE())
    # No prefix space and no normalizer: decode(encode(s)) must give s back byte for byte.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        # The full byte alphabet even if the corpus lacks some bytes, so nothing is ever unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return bpe
