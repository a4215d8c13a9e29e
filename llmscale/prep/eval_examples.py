"""Small evaluation sets made from the bundled plays, deterministic for a seed:

- next_line.jsonl (multiple choice): a speech's speaker and opening lines as `context`; the line
  that follows and three lines of other speeches of the same play as `choices`.
- next_speaker.jsonl (exact match): two consecutive speeches as `prompt`, as the plays print
  them; the name of whoever speaks next as `answer`.
"""

import json
import random
from pathlib import Path
from typing import Dict, List, Tuple

from llmscale.prep.play_quiz import TITLES, speech_lines

MIN_LINE_CHARS = 15
DISTRACTORS = 3
# Lines of each speech shown in a next-speaker prompt.
PROMPT_LINES = 3


def make_eval_examples(plays_dir: Path, output: Path, per_play: int = 6,
                       seed: int = 0) -> Dict[str, int]:
    rng = random.Random(seed)
    next_line, next_speaker = [], []
    for stem in TITLES:
        path = plays_dir / f"{stem}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the examples are made from the bundled "
                                    "plays")
        speeches = list(speech_lines(path))
        next_line += _next_lines(speeches, per_play, rng)
        next_speaker += _next_speakers(speeches, per_play, rng)
    output.mkdir(parents=True, exist_ok=True)
    _write_jsonl(output / "next_line.jsonl", next_line)
    _write_jsonl(output / "next_speaker.jsonl", next_speaker)
    return {"next_line": len(next_line), "next_speaker": len(next_speaker)}


def _next_lines(speeches: List[Tuple[str, List[str]]], count: int,
                rng: random.Random) -> List[dict]:
    """The speeches of three or more lines give the question; the others' lines the decoys."""
    usable = [i for i, (_, lines) in enumerate(speeches)
              if len(lines) >= 3 and len(lines[2]) >= MIN_LINE_CHARS]
    examples = []
    for index in rng.sample(usable, count):
        speaker, lines = speeches[index]
        answer = lines[2]
        others = sorted({line for i, (_, other) in enumerate(speeches) if i != index
                         for line in other if len(line) >= MIN_LINE_CHARS and line != answer})
        choices = rng.sample(others, DISTRACTORS) + [answer]
        rng.shuffle(choices)
        context = f"{speaker}.\n{lines[0]}\n{lines[1]}\n"
        examples.append({"context": context, "choices": choices, "label": choices.index(answer)})
    return examples


def _next_speakers(speeches: List[Tuple[str, List[str]]], count: int,
                   rng: random.Random) -> List[dict]:
    examples = []
    for index in rng.sample(range(2, len(speeches)), count):
        shown = speeches[index - 2:index]
        prompt = "".join(f"{speaker}.\n" + "\n".join(lines[:PROMPT_LINES]) + "\n\n"
                         for speaker, lines in shown)
        examples.append({"prompt": prompt, "answer": speeches[index][0]})
    return examples


def _write_jsonl(path: Path, records: List[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
