"""Evaluation split over 2 torchrun ranks gives the very results of one process."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
from launching import REPO_ROOT, clean_env, free_port
from test_scoring_and_generation import TINY, random_llama

from llmscale.checkpoint.hf import export_hf

TOOL = str(REPO_ROOT / "tools" / "evaluate.py")
TASKS = {
    "perplexity": ["--data", "data/shakespeare/tempest.txt", "--seq-len", "48",
                   "--max-windows", "13", "--batch-size", "2"],
    "choice": ["--examples", "data/eval/next_line.jsonl", "--delimiter", "", "--limit", "5"],
    "exact-match": ["--examples", "data/eval/next_speaker.jsonl", "--limit", "5",
                    "--max-new-tokens", "6", "--contains"],
}


def evaluate(launcher: list, task: str, model, output) -> dict:
    command = [*launcher, TOOL, task, str(model), "--tokenizer", "byte", "--output", str(output),
               *TASKS[task]]
    result = subprocess.run(command, cwd=REPO_ROOT, env=clean_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(output.read_text())
    assert report.pop("timing")["world_size"] == (1 if len(launcher) == 1 else 2)
    return report


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(TASKS))
def test_two_ranks_give_the_results_of_one_process(task, tmp_path):
    cfg = replace(TINY, max_seq_len=128)  # lines of the plays in bytes
    model = export_hf(random_llama(cfg).state_dict(), cfg, tmp_path / "hf")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port())]
    one = evaluate([sys.executable], task, model, tmp_path / "one.json")
    two = evaluate(torchrun, task, model, tmp_path / "two.json")
    assert two == one
    assert one["metrics"][{"perplexity": "windows"}.get(task, "examples")] in (5, 13)
