"""The evaluation examples in data/eval/, made from the bundled plays (deterministic).

    python tools/make_eval_examples.py [--output data/eval] [--per-play 6] [--seed 0]

Writes OUTPUT/next_line.jsonl (context/choices/label: `tools/evaluate.py choice`) and
OUTPUT/next_speaker.jsonl (prompt/answer: `tools/evaluate.py exact-match`).
"""

import argparse
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("llmscale") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmscale.config.load import REPO_ROOT  # noqa: E402
from llmscale.prep.eval_examples import make_eval_examples  # noqa: E402


def main(argv) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "data" / "eval")
    parser.add_argument("--plays", type=Path, default=REPO_ROOT / "data" / "shakespeare")
    parser.add_argument("--per-play", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        counts = make_eval_examples(args.plays, args.output, args.per_play, args.seed)
    except (FileNotFoundError, ValueError) as error:
        print(f"make_eval_examples: error: {error}", file=sys.stderr)
        return 2
    print(f"make_eval_examples: {counts['next_line']} next-line and {counts['next_speaker']} "
          f"next-speaker examples in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
