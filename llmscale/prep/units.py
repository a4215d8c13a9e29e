"""Text cut into units, for statistics that need words in a script that has no spaces.

Each CJK character is a unit, and so is each run of other letters and digits; punctuation and
spaces are not. Unit n-grams (hashed) feed both the repeated-n-gram filter and the MinHash
shingles of near-duplicate detection.
"""

import re

import numpy as np
import xxhash

_CJK_RANGES = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_UNITS = re.compile(f"[{_CJK_RANGES}]|[^\\W_{_CJK_RANGES}]+")
# Odd 64-bit multiplier of the polynomial that combines unit hashes into n-gram hashes.
_NGRAM_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


def text_units(text: str) -> list[str]:
    """Lower-cased units; together they hold exactly the letters and digits of `text`."""
    return _UNITS.findall(text.lower())


def ngram_hashes(units: list[str], n: int) -> np.ndarray:
    """64-bit hashes of every run of `n` consecutive units (one hash of all units when there
    are fewer than `n`, none when there are none). Equal n-grams hash equally in every process."""
    if not units:
        return np.zeros(0, dtype=np.uint64)
    unit_hashes = np.fromiter(
        (xxhash.xxh64_intdigest(unit.encode("utf-8")) for unit in units),
        dtype=np.uint64,
        count=len(units),
    )
    n = min(n, len(units))
    count = len(units) - n + 1
    hashes = unit_hashes[:count].copy()
    for offset in range(1, n):
        # uint64 array arithmetic wraps around, which is what a polynomial hash wants.
        hashes = hashes * _NGRAM_MULTIPLIER + unit_hashes[offset : offset + count]
    return hashes
