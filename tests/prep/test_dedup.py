from pathlib import Path

import numpy as np
import pytest
from corpus_fixtures import CHINESE, english_paragraphs

from llmscale.prep.dedup import DedupConfig, DedupIndex, content_hash, minhash_signature
from llmscale.prep.units import text_units

CONFIG = DedupConfig()
PARAGRAPHS = english_paragraphs(count=40)
LONG = "\n\n".join(PARAGRAPHS[:10])
OTHER = "\n\n".join(PARAGRAPHS[10:20])


def signature(text: str, config: DedupConfig = CONFIG) -> np.ndarray | None:
    return minhash_signature(text_units(text), config)


def edit_words(text: str, every: int) -> str:
    words = text.split(" ")
    return " ".join("CHANGED" if i % every == 0 else w for i, w in enumerate(words))


def check(index: DedupIndex, document: int, text: str) -> str | None:
    return index.check(document, content_hash(text), signature(text, index.config))


def test_signature_similarity_tracks_shared_shingles() -> None:
    a, b, c = signature(LONG), signature(edit_words(LONG, 60)), signature(OTHER)
    assert np.mean(a == b) > 0.8
    assert np.mean(a == c) < 0.1
    assert np.array_equal(a, signature(LONG))
    assert signature("...") is None


def test_first_copy_is_kept_and_later_copies_are_dropped(tmp_path: Path) -> None:
    index = DedupIndex(tmp_path / "index.sqlite", CONFIG)
    assert check(index, 1, LONG) is None
    assert check(index, 2, OTHER) is None
    assert check(index, 3, LONG) == "exact_duplicate"
    assert check(index, 4, edit_words(LONG, 60)) == "near_duplicate"
    assert check(index, 5, edit_words(LONG, 50)) == "near_duplicate"
    assert check(index, 6, edit_words(OTHER, 60)) == "near_duplicate"
    # Half the words changed is a different document.
    assert check(index, 7, edit_words(LONG, 2)) is None
    for number, text in enumerate(CHINESE, start=10):
        assert check(index, number, text) is None
    assert check(index, 20, CHINESE[3].replace("深度学习", "强化学习")) == "near_duplicate"
    # Three near duplicates of three kept documents: LONG (twice), OTHER, CHINESE[3].
    assert index.near_duplicate_clusters() == 3


def test_near_detection_can_be_turned_off_and_exact_too(tmp_path: Path) -> None:
    exact_only = DedupIndex(tmp_path / "exact.sqlite", DedupConfig(near_threshold=0.0))
    assert check(exact_only, 1, LONG) is None
    assert check(exact_only, 2, edit_words(LONG, 60)) is None
    assert check(exact_only, 3, LONG) == "exact_duplicate"
    nothing = DedupIndex(tmp_path / "none.sqlite", DedupConfig(exact=False, near_threshold=0.0))
    assert check(nothing, 1, LONG) is None and check(nothing, 2, LONG) is None


def test_threshold_decides_what_counts_as_near(tmp_path: Path) -> None:
    strict = DedupIndex(tmp_path / "strict.sqlite", DedupConfig(near_threshold=0.95))
    assert check(strict, 1, LONG) is None
    assert check(strict, 2, edit_words(LONG, 30)) is None
    loose = DedupIndex(tmp_path / "loose.sqlite", DedupConfig(near_threshold=0.5))
    assert check(loose, 1, LONG) is None
    assert check(loose, 2, edit_words(LONG, 30)) == "near_duplicate"


def test_only_committed_work_survives_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite"
    index = DedupIndex(path, CONFIG)
    assert index.load() is None
    check(index, 1, LONG)
    index.save({"position": 1})
    check(index, 2, OTHER)
    index.close()  # closed without saving: as if killed
    reopened = DedupIndex(path, CONFIG)
    assert reopened.load() == {"position": 1}
    assert check(reopened, 3, LONG) == "exact_duplicate"
    assert check(reopened, 4, OTHER) is None


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="near_threshold"):
        DedupConfig(near_threshold=1.0)
    with pytest.raises(ValueError, match="num_perm"):
        DedupConfig(num_perm=1)
