"""kill -9 a 2-rank run while it trains and while it saves, relaunch the same command each time:
the run must end with exactly the losses of a run that was never stopped."""

import subprocess
import time
from pathlib import Path

import psutil
import pytest
from launching import REPO_ROOT, clean_env, launch, metric_lines, metrics, pretrain_command

pytestmark = pytest.mark.slow

STEPS = 10
INTERVAL = 2
# Large enough that a save takes a while to write, so the test can catch one in progress.
MODEL = ["model.hidden_size=256", "model.num_layers=4", "model.intermediate_size=704",
         "optim.lr=1e-3"]


def _start(run_dir: Path, zero_stage: int) -> subprocess.Popen:
    command = pretrain_command(
        "torchrun", run_dir, *MODEL, f"parallel.zero_stage={zero_stage}",
        f"train.max_steps={STEPS}", f"checkpoint.interval={INTERVAL}", "checkpoint.keep_last=2",
    )
    return subprocess.Popen(command, cwd=REPO_ROOT, env=clean_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill_when(process: subprocess.Popen, condition, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before the test could kill it"
        assert time.monotonic() < deadline, "timed out waiting to kill the run"
        time.sleep(0.001)
    # torchrun starts each rank in a session of its own: kill the whole tree, as a lost node would.
    launcher = psutil.Process(process.pid)
    for member in [launcher, *launcher.children(recursive=True)]:
        member.kill()
    process.wait()


def _logged_step(run_dir: Path) -> int:
    return max(metrics(run_dir, "loss"), default=0) if (run_dir / "metrics.jsonl").exists() else 0


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_killed_runs_resume_to_the_uninterrupted_losses(zero_stage, tmp_path):
    reference, run_dir = tmp_path / "reference", tmp_path / "killed"
    launch("torchrun", reference, *MODEL, f"parallel.zero_stage={zero_stage}",
           f"train.max_steps={STEPS}", f"checkpoint.interval={INTERVAL}")
    expected = metrics(reference, "loss")

    # During training: once step 5 is logged, between saves.
    _kill_when(_start(run_dir, zero_stage), lambda: _logged_step(run_dir) >= 5)
    killed_at = _logged_step(run_dir)
    # During a save: the moment a step folder is being written.
    checkpoints = run_dir / "checkpoints"
    saved_before = {p.name for p in checkpoints.iterdir()}
    _kill_when(_start(run_dir, zero_stage),
               lambda: any(p.name not in saved_before for p in checkpoints.glob("step_*.partial")))
    interrupted = list(checkpoints.glob("step_*.partial"))
    assert interrupted, "the second kill did not land inside a save"

    lines_before = metric_lines(run_dir)
    stdout = launch("torchrun", run_dir, *MODEL, f"parallel.zero_stage={zero_stage}",
                    f"train.max_steps={STEPS}", f"checkpoint.interval={INTERVAL}",
                    "checkpoint.keep_last=2")
    resumed = metrics(run_dir, "loss", skip_lines=lines_before)
    first_resumed = min(resumed)
    # The partial save is ignored; at most one interval of work is lost per kill.
    resume_line = next(line for line in stdout.splitlines() if "resuming from" in line)
    assert resume_line.endswith(f"step_{first_resumed - 1:08d}"), (resume_line, first_resumed)
    assert int(interrupted[0].name[5:13]) - (first_resumed - 1) <= INTERVAL
    assert killed_at - (first_resumed - 1) <= 2 * INTERVAL
    assert sorted(resumed) == list(range(first_resumed, STEPS + 1))
    for step, loss in resumed.items():
        assert loss == expected[step], (step, loss, expected[step])
    assert metrics(run_dir, "val_loss")[STEPS] == metrics(reference, "val_loss")[STEPS]


@pytest.mark.parametrize("saved_stage, resumed_stage", [(2, 1), (2, 3), (3, 1)])
def test_two_ranks_resume_on_one_rank_at_another_zero_stage(saved_stage, resumed_stage, tmp_path):
    """2 ranks save at step 6; 1 rank at another ZeRO stage continues through a universal
    checkpoint with the same weights, optimizer state and global sample order."""
    reference, run_dir = tmp_path / "reference", tmp_path / "resharded"
    common = [f"train.max_steps={STEPS}", "checkpoint.interval=0"]
    launch("torchrun", reference, *common, f"parallel.zero_stage={saved_stage}")
    launch("torchrun", run_dir, *common, f"parallel.zero_stage={saved_stage}",
           "train.exit_at_step=6")
    lines_before = metric_lines(run_dir)
    stdout = launch("python", run_dir, *common, f"parallel.zero_stage={resumed_stage}")
    assert (f"converting it to a universal checkpoint for dp=1, tp=1, pp=1 at ZeRO-{resumed_stage}"
            in stdout)
    resumed, expected = metrics(run_dir, "loss", lines_before), metrics(reference, "loss")
    assert sorted(resumed) == list(range(7, STEPS + 1))
    # Step 7's loss is computed by the restored weights on the next global batch; the later
    # ones also by the restored Adam state and learning rate.
    for step, loss in resumed.items():
        assert abs(loss - expected[step]) / expected[step] < 1e-6, (step, loss, expected[step])
