"""Heuristic quality filters (in the spirit of Gopher/C4) that work for English and Chinese.

Word statistics are taken over units (llmscale.prep.units), which Chinese text has too.
"""

import re
from dataclasses import dataclass

import numpy as np

from llmscale.prep.units import ngram_hashes

LANGUAGES = ("en", "zh")

# Counting patterns match runs, not single characters: far fewer matches to build.
_HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_KANA = re.compile("[\u3040-\u30ff]+")
_DIGITS = re.compile(r"\d+")
# Punctuation that prose uses; anything else that is neither a letter, a digit nor a space
# counts as a symbol (markup, box drawing, emoji, "#####").
_PUNCTUATION = re.compile(
    "[!\"'(),\\-.:;?\\[\\]`_/&%*@\u2018\u2019\u201c\u201d\u2014\u2013\u2026"
    "\u3001\u3002\uff0c\uff1b\uff1a\uff1f\uff01\uff08\uff09\u300a\u300b\u3008\u3009"
    "\u3010\u3011\u300c\u300d\u300e\u300f\u00b7\u30fb]+"
)
_ENGLISH_STOPWORDS = frozenset(
    "the and of to a in is that it for was on with as be i you he his not but my this have are"
    " me at by what so we will all her no do shall thou thy".split()
)


@dataclass(frozen=True)
class QualityConfig:
    min_chars: int = 50
    max_chars: int = 1_000_000
    # Share of non-space characters that are letters or digits (CJK characters are letters).
    min_alnum_ratio: float = 0.6
    # Share of non-space characters that are neither letters, digits nor prose punctuation.
    max_symbol_ratio: float = 0.1
    # Share of characters in lines that repeat an earlier line of the same document.
    max_repeated_line_ratio: float = 0.3
    # Share of n-grams of units that repeat an earlier n-gram of the same document.
    max_repeated_ngram_ratio: float = 0.3
    ngram_size: int = 5
    # Languages to keep ("en", "zh"); empty keeps every document whatever its language.
    languages: tuple[str, ...] = LANGUAGES

    def __post_init__(self) -> None:
        if not 0 <= self.min_chars <= self.max_chars:
            raise ValueError(
                f"need 0 <= min_chars <= max_chars, got {self.min_chars} and {self.max_chars}."
            )
        if self.ngram_size < 1:
            raise ValueError(f"ngram_size must be >= 1, got {self.ngram_size}.")
        unknown = set(self.languages) - set(LANGUAGES)
        if unknown:
            raise ValueError(
                f"languages {sorted(unknown)} cannot be detected; "
                f"choose from {', '.join(LANGUAGES)}."
            )


def detect_language(text: str, units: list[str]) -> str:
    """ "zh", "en" or "other", from the scripts the letters are written in and, for English,
    the share of common English words (which tells it from other Latin-script languages)."""
    digits = _count(_DIGITS, text)
    letters = sum(map(len, units)) - digits
    if letters <= 0:
        return "other"
    han, kana = _count(_HAN, text), _count(_KANA, text)
    if han >= 0.3 * letters and kana < 0.1 * letters:
        return "zh"
    # ASCII letters stand in for English's alphabet; accented letters count against English.
    ascii_letters = sum(len(unit) for unit in units if unit.isascii()) - digits
    if ascii_letters >= 0.7 * letters:
        words = len(units) - han - kana
        stopwords = sum(1 for unit in units if unit in _ENGLISH_STOPWORDS)
        if words and stopwords >= 0.1 * words:
            return "en"
    return "other"


def drop_reason(text: str, units: list[str], config: QualityConfig) -> str | None:
    """Why the quality filters drop `text` (a reason name for the report), or None to keep it.
    `units` are `text_units(text)`."""
    if len(text) < config.min_chars:
        return "too_short"
    if len(text) > config.max_chars:
        return "too_long"
    # Units hold exactly the letters and digits.
    alnum = sum(map(len, units))
    non_space = sum(map(len, text.split()))
    if alnum < config.min_alnum_ratio * non_space:
        return "low_alnum_ratio"
    symbols = non_space - alnum - _count(_PUNCTUATION, text)
    if symbols > config.max_symbol_ratio * non_space:
        return "symbol_ratio"
    if repeated_line_ratio(text) > config.max_repeated_line_ratio:
        return "repeated_lines"
    if repeated_ngram_ratio(units, config.ngram_size) > config.max_repeated_ngram_ratio:
        return "repeated_ngrams"
    if config.languages and detect_language(text, units) not in config.languages:
        return "language"
    return None


def repeated_line_ratio(text: str) -> float:
    """Characters in non-blank lines that repeat an earlier line, over all characters."""
    seen: set[str] = set()
    repeated = 0
    for line in text.split("\n"):
        line = line.strip()
        if line in seen:
            repeated += len(line)
        elif line:
            seen.add(line)
    return repeated / max(len(text), 1)


def repeated_ngram_ratio(units: list[str], n: int) -> float:
    """Occurrences of n-grams beyond their first, over all n-gram occurrences."""
    hashes = ngram_hashes(units, n)
    if hashes.size == 0:
        return 0.0
    return (hashes.size - np.unique(hashes).size) / hashes.size


def _count(pattern: re.Pattern[str], text: str) -> int:
    """Characters in the runs `pattern` matches."""
    return sum(map(len, pattern.findall(text)))
