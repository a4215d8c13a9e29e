"""The evaluation examples shipped in data/eval/ are what tools/make_eval_examples.py makes."""

import json

from corpus_fixtures import REPO_ROOT

from llmscale.prep.eval_examples import make_eval_examples


def test_the_shipped_examples_are_made_again_identically(tmp_path):
    counts = make_eval_examples(REPO_ROOT / "data" / "shakespeare", tmp_path)
    assert counts == {"next_line": 48, "next_speaker": 48}
    for name in ("next_line.jsonl", "next_speaker.jsonl"):
        assert (tmp_path / name).read_text() == (REPO_ROOT / "data" / "eval" / name).read_text()
    for line in (tmp_path / "next_line.jsonl").read_text().splitlines():
        example = json.loads(line)
        assert len(set(example["choices"])) == 4
        assert 0 <= example["label"] < 4 and example["context"].count("\n") == 3
