"""Two nodes on one machine: two torchrun launchers with --nnodes 2, one rank each, meeting at
127.0.0.1 as a cluster's nodes meet at their master (launch/slurm starts the same command on
each node). They must train exactly as one 2-rank torchrun does; when one node is lost mid-run
the other must stop, and relaunching both must end with the losses of a run never stopped."""

import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import psutil
import pytest
from launching import QUIET, REPO_ROOT, clean_env, free_port, metric_lines, metrics

pytestmark = pytest.mark.slow

STEPS = 10
INTERVAL = 2
# Steps of ~0.4 s here: time to see step 5 logged and kill a node before the run ends.
MODEL = ["model.hidden_size=256", "model.num_layers=4", "model.intermediate_size=704"]
TRAIN = ["+exp=tiny", *QUIET, *MODEL, f"train.max_steps={STEPS}",
         f"checkpoint.interval={INTERVAL}"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
SCRIPT = str(REPO_ROOT / "launch" / "pretrain.py")
# torchrun sets 1 thread for two ranks on a node and leaves one rank a node all cores; the
# thread count changes the 7th digit of the loss, so both layouts get the same.
ENV = {**clean_env(), "OMP_NUM_THREADS": "1"}
# gloo notices a peer's closed sockets at once on one machine; a hang means a collective waits.
LOST_NODE_TIMEOUT = 90


def _node_command(run_dir: Path, node: int, port: int) -> List[str]:
    return [*TORCHRUN, "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
            "--master_addr", "127.0.0.1", "--master_port", str(port), SCRIPT,
            f"train.run_dir={run_dir}", *TRAIN]


def _start_nodes(run_dir: Path, port: int, log_name: str) -> List[subprocess.Popen]:
    nodes = []
    for node in (0, 1):
        with (run_dir.parent / f"{log_name}-node{node}.log").open("w") as log:
            nodes.append(subprocess.Popen(_node_command(run_dir, node, port), cwd=REPO_ROOT,
                                          env=ENV, stdout=log, stderr=subprocess.STDOUT))
    return nodes


def _finish(nodes: List[subprocess.Popen], run_dir: Path, log_name: str) -> str:
    """Node 0's output, once both nodes have trained to the end."""
    for node, process in enumerate(nodes):
        assert process.wait(timeout=300) == 0, _log(run_dir, log_name, node)
    return _log(run_dir, log_name, 0)


def _log(run_dir: Path, log_name: str, node: int) -> str:
    return (run_dir.parent / f"{log_name}-node{node}.log").read_text()


def _kill_tree(process: subprocess.Popen) -> None:
    launcher = psutil.Process(process.pid)
    for member in [launcher, *launcher.children(recursive=True)]:
        member.kill()
    process.wait()


def _logged_step(run_dir: Path) -> int:
    return max(metrics(run_dir, "loss"), default=0) if metric_lines(run_dir) else 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Dict[str, Dict[int, float]]:
    """Losses of one torchrun with 2 ranks, never stopped."""
    run_dir = tmp_path_factory.mktemp("one_node") / "run"
    result = subprocess.run(
        [*TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), SCRIPT,
         f"train.run_dir={run_dir}", *TRAIN],
        cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {key: metrics(run_dir, key) for key in ("loss", "val_loss")}


def test_two_nodes_train_as_one_node_with_two_ranks(reference, tmp_path):
    run_dir = tmp_path / "run"
    stdout = _finish(_start_nodes(run_dir, free_port(), "run"), run_dir, "run")
    assert "world 2 = dp 2" in stdout
    assert metrics(run_dir, "loss") == reference["loss"]
    assert metrics(run_dir, "val_loss") == reference["val_loss"]


def test_a_lost_node_stops_the_other_and_both_resume(reference, tmp_path):
    run_dir, port = tmp_path / "run", free_port()
    nodes = _start_nodes(run_dir, port, "killed")
    deadline = time.monotonic() + 300
    while _logged_step(run_dir) < 5:
        assert all(node.poll() is None for node in nodes), _log(run_dir, "killed", 0)
        assert time.monotonic() < deadline, "timed out waiting for step 5"
        time.sleep(0.001)
    # Node 1 is lost: its launcher and its rank, the way a failed machine takes both.
    _kill_tree(nodes[1])
    killed_at = _logged_step(run_dir)
    try:
        returncode = nodes[0].wait(timeout=LOST_NODE_TIMEOUT)
    except subprocess.TimeoutExpired:
        _kill_tree(nodes[0])
        pytest.fail(f"node 0 still ran {LOST_NODE_TIMEOUT} s after node 1 was lost")
    assert returncode != 0, _log(run_dir, "killed", 0)

    # The same command on both nodes again, as a requeued Slurm job runs it.
    lines_before = metric_lines(run_dir)
    stdout = _finish(_start_nodes(run_dir, port, "resumed"), run_dir, "resumed")
    resumed = metrics(run_dir, "loss", skip_lines=lines_before)
    first_resumed = min(resumed)
    resume_line = next(line for line in stdout.splitlines() if "resuming from" in line)
    assert resume_line.endswith(f"step_{first_resumed - 1:08d}"), (resume_line, first_resumed)
    # Step 4's save was complete before step 5 was logged; at most the steps since are redone.
    assert 4 <= first_resumed - 1 <= killed_at
    assert sorted(resumed) == list(range(first_resumed, STEPS + 1))
    for step, loss in resumed.items():
        assert loss == reference["loss"][step], (step, loss, reference["loss"][step])
    assert metrics(run_dir, "val_loss")[STEPS] == reference["val_loss"][STEPS]
