"""Tokenization: prose BPE, SMILES/protein/LaTeX domain vocabularies and modality markers."""

from scifm.tokenizers.domain import DOMAINS, DomainVocab
from scifm.tokenizers.scientific import ScientificTokenizer, TokenizerError

__all__ = ["DOMAINS", "DomainVocab", "ScientificTokenizer", "TokenizerError"]
