"""Characters that get their own token in the SMILES and LaTeX vocabularies."""

from __future__ import annotations

# Printable ASCII plus the common whitespace controls; everything else is spelled in UTF-8 bytes.
PRINTABLE_ASCII: list[str] = [chr(c) for c in range(0x20, 0x7F)] + ["\t", "\n", "\r"]
