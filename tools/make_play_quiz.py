"""The fine-tuning demo's data: "Which play is this speech from?" from the bundled plays.

    python tools/make_play_quiz.py --output runs/play_quiz [--train-per-play 150]
        [--held-out-per-play 25]

Writes OUTPUT/train.jsonl (prompt/response: tools/prepare_sft.py reads it),
OUTPUT/heldout.jsonl (prompt/answer: exact match), OUTPUT/heldout_choices.jsonl
(context/choices/label: multiple choice) and OUTPUT/pairs.jsonl (prompt/chosen/rejected:
tools/prepare_sft.py --pairs reads it; the held-out pairs last). No held-out speech is in the
training file or the training pairs.
"""

import argparse
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("llmscale") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmscale.config.load import REPO_ROOT  # noqa: E402
from llmscale.prep.play_quiz import make_play_quiz  # noqa: E402


def main(argv) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--plays", type=Path, default=REPO_ROOT / "data" / "shakespeare")
    parser.add_argument("--train-per-play", type=int, default=150)
    parser.add_argument("--held-out-per-play", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        counts = make_play_quiz(args.plays, args.output, args.train_per_play,
                                args.held_out_per_play, seed=args.seed)
    except (FileNotFoundError, ValueError) as error:
        print(f"make_play_quiz: error: {error}", file=sys.stderr)
        return 2
    print(f"make_play_quiz: {counts['train']} training and {counts['held_out']} held-out "
          f"questions in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
