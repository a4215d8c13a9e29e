"""A fine-tuning task with checkable answers, made from the bundled plays: "Which play is this
speech from?", the speaker's name and the speech's opening given, the title as the answer.

Speeches are split between training and held out by a hash of their text, so the split is the
same on every machine and no held-out speech is trained on. A speaker's name is a strong clue
(HAMLET is in one play only) that a model learns from the training speeches and then meets again
in held-out ones, so exact-match accuracy rises clearly within a short fine-tuning run.
"""

import json
import random
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

# The bundled files and their titles, as a model would be asked to write them.
TITLES = {
    "hamlet": "Hamlet",
    "julius_caesar": "Julius Caesar",
    "lear": "King Lear",
    "macbeth": "Macbeth",
    "midsummer_nights_dream": "A Midsummer Night's Dream",
    "othello": "Othello",
    "romeo_and_juliet": "Romeo and Juliet",
    "tempest": "The Tempest",
}
# A speech opens with its speaker alone on a line: "HAMLET.", "Ham.", "FIRST MURDERER.", "QUINCE".
_SPEAKER = re.compile(r"^[A-Z][A-Za-z']*(?: [A-Z][A-Za-z']*){0,2}\.?$")
_NOT_SPEAKERS = {"ACT", "SCENE", "THE", "EPILOGUE", "PROLOGUE", "FINIS", "THE END"}
MAX_SPEECH_CHARS = 160
# The characters of a speech that a preference pair's prompt quotes.
PAIR_OPENING_CHARS = 40


@dataclass(frozen=True)
class Speech:
    title: str
    speaker: str
    text: str


def speech_lines(play: Path) -> Iterator[Tuple[str, List[str]]]:
    """Each speech of `play` in order: its speaker and its lines, stripped, stage directions in
    brackets left out."""
    for block in re.split(r"\n\s*\n", play.read_text(encoding="utf-8")):
        lines = [line.strip() for line in block.strip().splitlines()]
        if len(lines) < 2 or not _SPEAKER.match(lines[0]):
            continue
        speaker = lines[0].rstrip(".")
        if speaker.upper() in _NOT_SPEAKERS or speaker.split()[0].upper() in _NOT_SPEAKERS:
            continue
        spoken = [line for line in lines[1:] if not line.startswith("[")]
        if spoken:
            yield speaker, spoken


def speeches(play: Path, title: str, min_chars: int = 40) -> Iterator[Speech]:
    """The speeches of `play` with at least `min_chars` characters, cut at a line end near
    `MAX_SPEECH_CHARS` (stage directions in brackets left out)."""
    for speaker, lines in speech_lines(play):
        text = ""
        for line in lines:
            if text and len(text) + len(line) > MAX_SPEECH_CHARS:
                break
            text = f"{text} {line}".strip()
        if len(text) >= min_chars:
            yield Speech(title, speaker, text)


def question(speech: Speech) -> str:
    titles = ", ".join(TITLES.values())
    return (f"Which play is this speech from? Answer with the title only, one of: {titles}.\n\n"
            f"{speech.speaker}: {speech.text}")


def is_held_out(speech: Speech, held_out_percent: int) -> bool:
    return zlib.crc32(f"{speech.title}|{speech.text}".encode()) % 100 < held_out_percent


def make_play_quiz(plays_dir: Path, output: Path, train_per_play: int, held_out_per_play: int,
                   held_out_percent: int = 20, seed: int = 0) -> Dict[str, int]:
    """Write `output/train.jsonl` (prompt/response, for tools/prepare_sft.py),
    `output/heldout.jsonl` (prompt/answer, for exact match), `output/heldout_choices.jsonl`
    (context/choices/label, for multiple choice by likelihood), the same number per play, and
    `output/pairs.jsonl` (prompt/chosen/rejected, for tools/prepare_sft.py --pairs): a pair per
    training speech, then one per held-out speech, so the held-out pairs are the file's last
    ones, which data.val_fraction = held_out / (train + held_out) holds out."""
    rng = random.Random(seed)
    train: List[Speech] = []
    held_out: List[Speech] = []
    for stem, title in TITLES.items():
        path = plays_dir / f"{stem}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the quiz is made from the bundled plays "
                                    f"({', '.join(f'{name}.txt' for name in TITLES)})")
        found = list(speeches(path, title))
        rng.shuffle(found)
        play_train = [s for s in found if not is_held_out(s, held_out_percent)]
        play_held_out = [s for s in found if is_held_out(s, held_out_percent)]
        if len(play_train) < train_per_play or len(play_held_out) < held_out_per_play:
            raise ValueError(
                f"{path} has {len(play_train)} training and {len(play_held_out)} held-out "
                f"speeches, fewer than the {train_per_play} and {held_out_per_play} asked for")
        train += play_train[:train_per_play]
        held_out += play_held_out[:held_out_per_play]
    rng.shuffle(train)
    output.mkdir(parents=True, exist_ok=True)
    titles = list(TITLES.values())
    _write_jsonl(output / "train.jsonl",
                 ({"prompt": question(s), "response": s.title} for s in train))
    _write_jsonl(output / "heldout.jsonl",
                 ({"prompt": question(s), "answer": s.title} for s in held_out))
    _write_jsonl(output / "heldout_choices.jsonl",
                 ({"context": question(s), "choices": titles, "label": titles.index(s.title)}
                  for s in held_out))
    _write_jsonl(output / "pairs.jsonl", (preference_pair(s, rng) for s in train + held_out))
    return {"train": len(train), "held_out": len(held_out)}


def preference_pair(speech: Speech, rng: random.Random) -> Dict[str, str]:
    """The right title chosen, another play's rejected. The prompt is the speaker and the
    speech's opening words alone (`PAIR_OPENING_CHARS`): a third of `question`'s length, so
    that the tiny byte-level model learns the speaker clue within a minute's DPO."""
    wrong = rng.choice([title for title in TITLES.values() if title != speech.title])
    opening = speech.text[:PAIR_OPENING_CHARS].rsplit(" ", 1)[0]
    return {"prompt": f"Which play is this from? {speech.speaker}: {opening} ...",
            "chosen": speech.title, "rejected": wrong}


def _write_jsonl(path: Path, records) -> None:
    with path.open("w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
