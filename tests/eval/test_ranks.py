"""Evaluation split over 2 torchrun ranks gives the very results of one process."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from evaluate_tasks import TASKS, evaluate_tasks
from launching import REPO_ROOT, clean_env, free_port
from test_scoring_and_generation import TINY, random_llama

from llmscale.checkpoint.hf import export_hf

WORKER = Path(__file__).with_name("evaluate_tasks.py")


def reports(out_dir: Path, world_size: int) -> dict:
    found = {}
    for task in TASKS:
        report = json.loads((out_dir / f"{task}.json").read_text())
        assert report.pop("timing")["world_size"] == world_size
        found[task] = report
    return found


@pytest.mark.slow
def test_two_ranks_give_the_results_of_one_process(tmp_path, monkeypatch):
    cfg = replace(TINY, max_seq_len=128)  # lines of the plays in bytes
    model = str(export_hf(random_llama(cfg).state_dict(), cfg, tmp_path / "hf"))
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(free_port()), str(WORKER), model, str(tmp_path / "two")],
        cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    monkeypatch.chdir(REPO_ROOT)
    for variable in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(variable, raising=False)
    evaluate_tasks(model, tmp_path / "one")
    one, two = reports(tmp_path / "one", 1), reports(tmp_path / "two", 2)
    assert two == one
    # uneven shares: 13 windows in 7 batches, 5 examples
    assert [one[task]["metrics"].get("examples", one[task]["metrics"].get("windows"))
            for task in TASKS] == [13, 5, 5]
