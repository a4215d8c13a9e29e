import pytest
from corpus_fixtures import CHINESE, english_paragraphs

from llmscale.prep.quality import (
    QualityConfig,
    detect_language,
    drop_reason,
    repeated_line_ratio,
    repeated_ngram_ratio,
)
from llmscale.prep.units import text_units

DEFAULT = QualityConfig()


def reason(text: str, config: QualityConfig = DEFAULT) -> str | None:
    return drop_reason(text, text_units(text), config)


def test_real_english_and_chinese_prose_passes_every_filter() -> None:
    for text in english_paragraphs() + CHINESE:
        assert reason(text) is None, text[:80]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Too short to keep.", "too_short"),
        ("x " * 600_000, "too_long"),
        ("!!! ??? ... ;;; --- ::: ''' " * 10 + "the end", "low_alnum_ratio"),
        (
            "The price is $5 + $6 = $11 ~ ©®™ ★★★ for all of the people in the town " * 3,
            "symbol_ratio",
        ),
        (
            "Buy now and save today.\n" * 10 + "A last line that differs from the rest.",
            "repeated_lines",
        ),
        ("the cat sat on the mat and the dog ran " * 8, "repeated_ngrams"),
        (
            "Le petit prince est un livre écrit par Antoine de Saint-Exupéry, publié à New York.",
            "language",
        ),
    ],
)
def test_each_filter_drops_what_it_targets(text: str, expected: str) -> None:
    assert reason(text) == expected


def test_thresholds_are_configurable() -> None:
    short = "A brief note."
    assert reason(short) == "too_short"
    assert reason(short, QualityConfig(min_chars=5, languages=())) is None
    french = "Le petit prince est un livre écrit par Antoine de Saint-Exupéry et publié à New York."
    assert reason(french, QualityConfig(languages=())) is None
    assert reason(CHINESE[0], QualityConfig(languages=("en",))) == "language"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (english_paragraphs()[3], "en"),
        (CHINESE[2], "zh"),
        (
            "Die Katze sitzt auf der Matte und schläft in der Sonne, während der Hund bellt.",
            "other",
        ),
        ("吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。", "other"),
        ("1234 5678 90", "other"),
    ],
)
def test_language_detection(text: str, expected: str) -> None:
    assert detect_language(text, text_units(text)) == expected


def test_repetition_measures() -> None:
    assert repeated_line_ratio("a\nb\nc") == 0.0
    text = "same line\nsame line\nother"
    assert repeated_line_ratio(text) == pytest.approx(len("same line") / len(text))
    units = text_units("one two three one two three")
    # 2-grams: (one two) (two three) (three one) (one two) (two three): 2 of 5 repeat.
    assert repeated_ngram_ratio(units, 2) == pytest.approx(2 / 5)
    # Chinese repeats are counted by characters.
    # 6 five-grams of characters, the last repeating the first.
    assert repeated_ngram_ratio(text_units("白日依山尽白日依山尽"), 5) == pytest.approx(1 / 6)
    assert repeated_ngram_ratio(units, 10) == 0.0


def test_inconsistent_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="min_chars <= max_chars"):
        QualityConfig(min_chars=10, max_chars=5)
    with pytest.raises(ValueError, match="cannot be detected"):
        QualityConfig(languages=("fr",))
