"""Start real training runs in subprocesses, the way a user does, and read what they logged."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
QUIET = ["logging.tensorboard=false", "logging.progress_bar=false"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pretrain_command(launcher: str, run_dir: Path, *overrides: str, ranks: int = 2) -> List[str]:
    script = str(REPO_ROOT / "launch" / "pretrain.py")
    port = str(free_port())
    prefix = {
        "python": [sys.executable, script],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                     str(ranks), "--master_port", port, script],
        "deepspeed": [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks),
                      "--master_port", port, script],
    }[launcher]
    return prefix + ["+exp=tiny", f"train.run_dir={run_dir}", *QUIET, *overrides]


def clean_env() -> Dict[str, str]:
    """Without the variables of any launcher the test itself runs under."""
    return {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


def launch(launcher: str, run_dir: Path, *overrides: str, ranks: int = 2) -> str:
    result = subprocess.run(
        pretrain_command(launcher, run_dir, *overrides, ranks=ranks), cwd=REPO_ROOT,
        env=clean_env(), capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def start(launcher: str, run_dir: Path, *overrides: str, ranks: int = 2) -> subprocess.Popen:
    """A run in the background, for a test to interrupt."""
    return subprocess.Popen(
        pretrain_command(launcher, run_dir, *overrides, ranks=ranks), cwd=REPO_ROOT,
        env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for(process: subprocess.Popen, condition: Callable[[], bool],
             timeout: float = 300) -> None:
    """Until `condition()` holds, polled every millisecond, while the run goes on."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before the test could act"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.001)


def kill_when(process: subprocess.Popen, condition: Callable[[], bool], one_rank: bool = False,
              timeout: float = 300) -> None:
    """SIGKILL once `condition()` holds: the whole process tree, as a lost node would, or one
    training rank (the launcher then ends the others)."""
    wait_for(process, condition, timeout)
    # torchrun starts each rank in a session of its own: kill the tree, not the process group.
    launcher = psutil.Process(process.pid)
    victims = (launcher.children()[-1:] if one_rank
               else [launcher, *launcher.children(recursive=True)])
    for member in victims:
        member.kill()
    process.wait()


def metrics(run_dir: Path, key: str, skip_lines: int = 0) -> Dict[int, float]:
    """`key` by step from the run's metrics.jsonl, after its first `skip_lines` records."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()[skip_lines:]
    return {record["step"]: record[key] for record in map(json.loads, lines) if key in record}


def metric_lines(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def load_tool(name: str = "convert_checkpoint"):
    """A script of tools/ as a module, to call its `main` in the test process."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "tools" / f"{name}.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool
