"""`llmscale-evaluate` (llmscale/eval/cli.py) from a checkout, installed or not."""

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("llmscale") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmscale.eval.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
