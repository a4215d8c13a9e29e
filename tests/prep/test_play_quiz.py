"""The fine-tuning demo's quiz: balanced, checkable, and never training on a held-out speech."""

import json
from collections import Counter

import pytest
from corpus_fixtures import REPO_ROOT

from llmscale.prep.play_quiz import TITLES, make_play_quiz

PLAYS = REPO_ROOT / "data" / "shakespeare"


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def quiz(tmp_path_factory):
    output = tmp_path_factory.mktemp("quiz")
    counts = make_play_quiz(PLAYS, output, train_per_play=40, held_out_per_play=10)
    return output, counts


def test_each_play_has_its_share_and_answers_name_the_play(quiz):
    output, counts = quiz
    train, held_out = read(output / "train.jsonl"), read(output / "heldout.jsonl")
    assert counts == {"train": 320, "held_out": 80}
    assert Counter(r["response"] for r in train) == {title: 40 for title in TITLES.values()}
    assert Counter(r["answer"] for r in held_out) == {title: 10 for title in TITLES.values()}
    # Every speech is the one its answer names: its text is in that play's file.
    files = {title: (PLAYS / f"{stem}.txt").read_text() for stem, title in TITLES.items()}
    for record in held_out[:20]:
        speech = record["prompt"].split("\n\n", 1)[1].split(": ", 1)[1]
        first_line = speech[:30]
        assert first_line in " ".join(files[record["answer"]].split()), record


def test_no_held_out_speech_is_trained_on(quiz):
    output, _ = quiz
    trained = {r["prompt"] for r in read(output / "train.jsonl")}
    assert not trained & {r["prompt"] for r in read(output / "heldout.jsonl")}


def test_multiple_choice_file_labels_the_answer(quiz):
    output, _ = quiz
    held_out, choices = read(output / "heldout.jsonl"), read(output / "heldout_choices.jsonl")
    assert [r["context"] for r in choices] == [r["prompt"] for r in held_out]
    assert [r["choices"][r["label"]] for r in choices] == [r["answer"] for r in held_out]


def test_the_same_seed_makes_the_same_quiz(quiz, tmp_path):
    output, _ = quiz
    make_play_quiz(PLAYS, tmp_path, train_per_play=40, held_out_per_play=10)
    assert (tmp_path / "train.jsonl").read_text() == (output / "train.jsonl").read_text()


def test_asking_for_more_than_a_play_holds_names_the_play(tmp_path):
    with pytest.raises(ValueError, match=r"hamlet.txt has \d+ training"):
        make_play_quiz(PLAYS, tmp_path, train_per_play=10_000, held_out_per_play=1)


def test_preference_pairs_choose_the_answer_and_hold_out_the_last(quiz):
    output, counts = quiz
    pairs = read(output / "pairs.jsonl")
    train, held_out = read(output / "train.jsonl"), read(output / "heldout.jsonl")
    assert len(pairs) == counts["train"] + counts["held_out"]
    # The same speeches, in the same order: the speaker and the opening quoted.
    questions = [(r["prompt"], r["response"]) for r in train] + [
        (r["prompt"], r["answer"]) for r in held_out]
    for pair, (question, answer) in zip(pairs, questions):
        speech = question.split("\n\n", 1)[1]
        assert pair["prompt"].startswith("Which play is this from? ")
        assert speech.startswith(pair["prompt"].removeprefix("Which play is this from? ")[:-4])
        assert pair["chosen"] == answer
    assert all(p["rejected"] != p["chosen"] and p["rejected"] in TITLES.values() for p in pairs)
    assert len({p["rejected"] for p in pairs}) == len(TITLES)
