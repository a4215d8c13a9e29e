"""Runs `llmscale-evaluate` on each task of TASKS in one process (under torchrun: on each rank, in
one process group), for tests/eval/test_ranks.py: `python evaluate_tasks.py MODEL OUT_DIR`."""

import sys
from pathlib import Path

from llmscale.eval.cli import main
from llmscale.eval.ranks import evaluation_ranks

TASKS = {
    "perplexity": ["--data", "data/shakespeare/tempest.txt", "--seq-len", "48",
                   "--max-windows", "13", "--batch-size", "2"],
    "choice": ["--examples", "data/eval/next_line.jsonl", "--delimiter", "", "--limit", "5"],
    "exact-match": ["--examples", "data/eval/next_speaker.jsonl", "--limit", "5",
                    "--max-new-tokens", "6", "--contains"],
}


def evaluate_tasks(model: str, out_dir: Path) -> None:
    with evaluation_ranks():
        for task, options in TASKS.items():
            code = main([task, model, "--tokenizer", "byte", "--output",
                         str(Path(out_dir) / f"{task}.json"), *options])
            if code:
                raise SystemExit(code)


if __name__ == "__main__":
    evaluate_tasks(sys.argv[1], Path(sys.argv[2]))
