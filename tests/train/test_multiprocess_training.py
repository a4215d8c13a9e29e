"""Whole runs through the real launchers, 1 and 2 CPU ranks: data parallelism and resume must not
change what is learned."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
STEPS = 10
QUIET = ["logging.tensorboard=false", "logging.progress_bar=false"]

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch(launcher: str, run_dir: Path, *overrides: str) -> str:
    script = str(REPO_ROOT / "launch" / "pretrain.py")
    port = str(_free_port())
    command = {
        "python": [sys.executable, script],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                     "--master_port", port, script],
        "deepspeed": [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2",
                      "--master_port", port, script],
    }[launcher]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run(
        command + ["+exp=tiny", f"train.run_dir={run_dir}", *QUIET, *overrides],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _metrics(run_dir: Path, key: str) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: record[key] for record in records if key in record}


@pytest.fixture(scope="module")
def single_process_losses(tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("single")
    _launch("python", run_dir, f"train.max_steps={STEPS}", "checkpoint.interval=0",
            "checkpoint.save_final=false")
    return _metrics(run_dir, "loss")


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_two_ranks_match_one_process(zero_stage, single_process_losses, tmp_path):
    """Same global batch of 16: 1 process accumulates 2 micro-batches, 2 ranks take one each."""
    _launch("torchrun", tmp_path, f"train.max_steps={STEPS}", f"parallel.zero_stage={zero_stage}",
            "checkpoint.interval=0", "checkpoint.save_final=false")
    losses = _metrics(tmp_path, "loss")
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, reference in single_process_losses.items():
        assert abs(losses[step] - reference) / abs(reference) < 1e-5, (step, losses[step], reference)
    assert losses[STEPS] < losses[1] - 0.5


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_stop_and_resume_equals_uninterrupted_run(zero_stage, tmp_path):
    common = [f"train.max_steps={STEPS}", f"parallel.zero_stage={zero_stage}",
              "checkpoint.interval=4"]
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    _launch("torchrun", uninterrupted, *common)
    _launch("torchrun", interrupted, *common, "train.exit_at_step=6")
    assert max(_metrics(interrupted, "loss")) == 6
    lines_before_resume = len((interrupted / "metrics.jsonl").read_text().splitlines())
    # Like Megatron's --exit-interval, stopping early saves a final checkpoint.
    stdout = _launch("torchrun", interrupted, *common)
    assert "resuming from" in stdout and "step_00000006" in stdout
    expected = _metrics(uninterrupted, "loss")
    lines = (interrupted / "metrics.jsonl").read_text().splitlines()[lines_before_resume:]
    resumed = {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}
    assert sorted(resumed) == list(range(7, STEPS + 1))
    for step in range(7, STEPS + 1):
        assert resumed[step] == expected[step], step
    assert _metrics(interrupted, "val_loss")[STEPS] == _metrics(uninterrupted, "val_loss")[STEPS]


def test_demo_run_learns_and_says_where_it_wrote(tmp_path):
    """The README's demo: the DeepSpeed launcher, 2 ranks, the tiny experiment's full length."""
    stdout = _launch("deepspeed", tmp_path)
    val_ppl = _metrics(tmp_path, "val_ppl")
    assert max(val_ppl) >= 200
    assert val_ppl[0] / val_ppl[max(val_ppl)] >= 3.0, val_ppl
    for line in (f"run folder:  {tmp_path}", f"metrics:     {tmp_path / 'metrics.jsonl'}",
                 f"checkpoint:  {tmp_path / 'checkpoints'}"):
        assert line in stdout
    assert (tmp_path / "config.yaml").is_file()
