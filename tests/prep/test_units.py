import numpy as np

from llmscale.prep.units import ngram_hashes, text_units


def test_cjk_characters_are_units_and_other_words_are_runs() -> None:
    assert text_units("Hello, 世界! GPT-4 说：你好") == [
        "hello",
        "世",
        "界",
        "gpt",
        "4",
        "说",
        "你",
        "好",
    ]
    assert text_units("snake_case ok") == ["snake", "case", "ok"]
    assert text_units("... ，。") == []


def test_equal_ngrams_hash_equal_and_different_ones_differ() -> None:
    hashes = ngram_hashes(text_units("a b c a b c d"), 3)
    assert len(hashes) == 5
    assert hashes[0] == hashes[3]
    assert len(np.unique(hashes)) == 4
    # The same n-gram in another document hashes the same (no per-process seed).
    assert ngram_hashes(["a", "b", "c"], 3)[0] == hashes[0]
    assert ngram_hashes(["b", "a", "c"], 3)[0] != hashes[0]


def test_short_texts_hash_as_one_ngram_and_empty_as_none() -> None:
    assert len(ngram_hashes(["only", "two"], 5)) == 1
    assert ngram_hashes(["only", "two"], 5)[0] == ngram_hashes(["only", "two"], 2)[0]
    assert ngram_hashes([], 5).size == 0
