"""A rank that hangs mid-training must not hang the others: they stop once a collective has waited
`train.collective_timeout_s`, with an error that names them, their host and the likely cause."""

import contextlib
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import List

import psutil
import pytest
from launching import REPO_ROOT, clean_env, metrics, pretrain_command

from llmscale.config import ConfigError, load_config, validate

TIMEOUT_S = 10
# Reading the message and the process exiting, on a loaded 2-core machine.
MARGIN_S = 20


def _logged_step(run_dir: Path) -> int:
    return max(metrics(run_dir, "loss"), default=0) if (run_dir / "metrics.jsonl").exists() else 0


def _worker(launcher: psutil.Process, rank: int) -> psutil.Process:
    [worker] = [p for p in launcher.children(recursive=True)
                if p.environ().get("RANK") == str(rank)]
    return worker


def _kill_tree(launcher: psutil.Process) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        for member in [launcher, *launcher.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()


@pytest.mark.slow
def test_a_hung_rank_makes_the_other_exit_with_a_clear_error_within_the_timeout(tmp_path):
    command = pretrain_command(
        "torchrun", tmp_path, "train.max_steps=100000", "checkpoint.interval=0",
        "checkpoint.save_final=false", f"train.collective_timeout_s={TIMEOUT_S}",
    )
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=clean_env(), text=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines: List[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr))
    reader.start()
    launcher = psutil.Process(process.pid)
    try:
        deadline = time.monotonic() + 300
        while _logged_step(tmp_path) < 2:
            assert process.poll() is None, "".join(lines)[-3000:]
            assert time.monotonic() < deadline, "the run did not reach step 2"
            time.sleep(0.1)
        rank0, rank1 = _worker(launcher, 0), _worker(launcher, 1)
        # SIGSTOP: rank 1 stays alive with its connections open and answers nothing, as a rank
        # stuck in a driver call or on a failing node does.
        rank1.suspend()
        try:
            rank0.wait(timeout=TIMEOUT_S + MARGIN_S)
        except psutil.TimeoutExpired:
            pytest.fail(f"rank 0 still ran {TIMEOUT_S + MARGIN_S} s after rank 1 hung")
        rank1.kill()
        launcher_status = process.wait(timeout=60)
    finally:
        _kill_tree(launcher)
        process.wait()
        reader.join()

    assert launcher_status != 0
    expected = (f"llmscale: error: rank 0 on host {socket.gethostname()}: a collective did not "
                f"complete within train.collective_timeout_s={TIMEOUT_S} s; another rank probably "
                "died or hung (see its log)")
    output = "".join(lines)
    assert expected in output, output[-3000:]


@pytest.mark.parametrize("value", ["0", "-5"])
def test_a_timeout_that_is_not_positive_is_refused(value):
    with pytest.raises(ConfigError) as caught:
        validate(load_config(["+exp=tiny", f"train.collective_timeout_s={value}"]), 1)
    assert f"train.collective_timeout_s={float(value)} must be positive" in str(caught.value)
