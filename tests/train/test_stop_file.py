"""A graceful stop through `train.stop_file` (what the SLURM scripts do before the time limit):
the run saves at the end of the step it is in, exits cleanly, and the same command resumes to
the losses of a run that never stopped."""

import json
import subprocess
import time

import pytest
from launching import REPO_ROOT, clean_env, launch, metric_lines, metrics, pretrain_command

STEPS = 60
COMMON = [f"train.max_steps={STEPS}", "checkpoint.interval=0", "train.log_interval=1"]

pytestmark = pytest.mark.slow


def test_stop_file_saves_exits_and_the_relaunch_resumes_exactly(tmp_path):
    reference, run_dir, stop_file = tmp_path / "reference", tmp_path / "run", tmp_path / "stop"
    launch("torchrun", reference, *COMMON)
    stop_file.write_text("left over from an earlier stop")  # a fresh launch must ignore it
    command = pretrain_command("torchrun", run_dir, *COMMON, f"train.stop_file={stop_file}")
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=clean_env(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while metric_lines(run_dir) < 5 or stop_file.exists():  # step 1 logged, the stale file gone
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
        time.sleep(0.05)
    stop_file.touch()
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    stopped_at = max(metrics(run_dir, "loss"))
    assert stopped_at < STEPS, "the run ended before it saw the stop file"
    assert f"appeared: saved step {stopped_at} and stopped" in output
    state = json.loads((run_dir / "checkpoints" / f"step_{stopped_at:08d}" /
                        "llmscale_state.json").read_text())
    assert state["train_state"]["step"] == stopped_at

    lines_before = metric_lines(run_dir)
    launch("torchrun", run_dir, *COMMON, f"train.stop_file={stop_file}")
    resumed, expected = metrics(run_dir, "loss", lines_before), metrics(reference, "loss")
    assert sorted(resumed) == list(range(stopped_at + 1, STEPS + 1))
    for step, loss in resumed.items():
        assert loss == expected[step], (step, loss, expected[step])
