import json
from pathlib import Path

import pytest
from corpus_fixtures import CHINESE, english_paragraphs

from llmscale.data.character_coverage import cjk_share, default_character_coverage


def written(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_cjk_share_counts_non_space_characters(tmp_path: Path) -> None:
    # Five Han characters, then ",", "o", "k": spaces and newlines do not count.
    assert cjk_share([written(tmp_path / "a.txt", "床前明月光, o k\n")]) == 5 / 8
    assert cjk_share([written(tmp_path / "empty.txt", "")]) == 0.0


@pytest.mark.parametrize(
    ("texts", "coverage"),
    [
        (CHINESE, 0.9995),
        (english_paragraphs(count=20), 1.0),
        # A Chinese paragraph among twenty English ones: under a tenth of the characters.
        (english_paragraphs(count=20) + CHINESE[:1], 1.0),
        (["ひらがなとカタカナと漢字", "한국어 문장입니다"], 0.9995),
        ([], 1.0),
    ],
)
def test_coverage_follows_the_script(texts: list[str], coverage: float, tmp_path: Path) -> None:
    # As the cleaning stage writes its parts: JSON lines with the text unescaped.
    lines = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
    assert default_character_coverage([written(tmp_path / "part.jsonl", lines)]) == coverage
