"""SentencePiece's character coverage chosen by the script of the training text, when the user
gives none.

At coverage 1.0 every distinct character must get a piece of its own. Chinese and Japanese text
holds thousands of them, more than a small vocabulary has room for, so training fails; the
Chinese LLM tokenizers train at 0.9995, leaving the rarest characters to byte fallback. Text in
a small alphabet keeps every character at 1.0.
"""

from collections.abc import Iterable
from pathlib import Path

import numpy as np

CJK_COVERAGE = 0.9995
FULL_COVERAGE = 1.0
# A tenth of the text in CJK already brings more distinct characters than a vocabulary of a
# few thousand pieces holds.
CJK_HEAVY_SHARE = 0.1
_CHUNK_BYTES = 16 << 20
# Counted on UTF-8 bytes, at memory speed instead of Python's per-character speed: every
# character has one byte outside 0x80-0xBF (its continuation bytes), and the 3-byte characters
# U+3000-U+DFFF (CJK punctuation, kana, Han, Hangul) start with a byte in 0xE3-0xED.
_CONTINUATION = slice(0x80, 0xC0)
_CJK_LEAD = slice(0xE3, 0xEE)
_WHITESPACE = list(b" \t\n\r")


def cjk_share(paths: Iterable[Path]) -> float:
    """The share of the non-space characters of the UTF-8 files `paths` that are CJK."""
    counts = np.zeros(256, dtype=np.int64)
    for path in paths:
        with Path(path).open("rb") as file:
            while chunk := file.read(_CHUNK_BYTES):
                counts += np.bincount(np.frombuffer(chunk, dtype=np.uint8), minlength=256)
    characters = counts.sum() - counts[_CONTINUATION].sum() - counts[_WHITESPACE].sum()
    return float(counts[_CJK_LEAD].sum() / characters) if characters else 0.0


def default_character_coverage(paths: Iterable[Path]) -> float:
    """0.9995 for CJK-heavy training text, 1.0 otherwise."""
    return CJK_COVERAGE if cjk_share(paths) >= CJK_HEAVY_SHARE else FULL_COVERAGE
