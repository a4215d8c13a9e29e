"""The sbatch scripts in launch/slurm, rendered for a sample 2-node allocation: bash runs them
with Slurm's variables set and stand-ins for scontrol, srun, torchrun and python that record
what they are asked, so the test sees the command and environment each node would get.

Where a Slurm controller answers, `sbatch --test-only` also checks the scripts against it (on a
real cluster, set SBATCH_PARTITION / SBATCH_ACCOUNT as sbatch itself reads them)."""

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
from launching import REPO_ROOT

from llmscale.config import load_config

SCRIPTS = ["pretrain.sbatch", "continued.sbatch", "bench.sbatch", "sweep.sbatch"]
TRAINING_SCRIPTS = ["pretrain.sbatch", "continued.sbatch"]
JOB_ID = 4242
HOSTS = ["gpu-node-07", "gpu-node-08"]
ALLOCATION = {
    "SLURM_JOB_ID": str(JOB_ID),
    "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
    "SLURM_NNODES": "2",
    # The batch script runs on the first node.
    "SLURM_NODEID": "0",
    "SLURM_GPUS_ON_NODE": "8",
    "SLURM_CPUS_ON_NODE": "96",
}
# Each training script's own arguments before the ones passed to sbatch.
STOP_FILES = {script: f"runs/slurm/llmscale-{kind}-{JOB_ID}/stop"
              for script, kind in (("pretrain.sbatch", "pretrain"),
                                   ("continued.sbatch", "continued"))}
FIXED_ARGS = {
    "pretrain.sbatch": ["launch/pretrain.py", "train.resume=auto",
                        f"train.stop_file={STOP_FILES['pretrain.sbatch']}"],
    "continued.sbatch": ["launch/pretrain.py", "+exp=continued_smollm2", "checkpoint.interval=10",
                         "train.resume=auto", f"train.stop_file={STOP_FILES['continued.sbatch']}"],
}
# One argument with a space and a `$`: it must arrive as one, unchanged.
USER_ARGS = ["train.max_steps=20", "train.run_dir=/scratch/llm runs/$HOME"]

STUBS = {
    # Expands only the sample allocation's node list; records every call.
    "scontrol": """#!/bin/bash
echo "$*" >> "$RECORD/scontrol.log"
if [[ "$1 $2 $3" == "show hostnames gpu-node-[07-08]" ]]; then
    printf 'gpu-node-07\\ngpu-node-08\\n'
fi
""",
    # Records its arguments, then runs the step's command once per node, as srun does on each.
    "srun": """#!/bin/bash
printf '%s\\0' "$@" > "$RECORD/srun.args"
while [[ "$1" == --* ]]; do shift; done
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node "$@"
done
""",
    # Records its arguments and environment; with STUB_BLOCK set, trains until $STOP_FILE
    # appears, then saves (a second) and exits, as training does.
    "torchrun": """#!/bin/bash
printf '%s\\0' "$@" > "$RECORD/torchrun.node$SLURM_NODEID.args"
env -0 > "$RECORD/torchrun.node$SLURM_NODEID.env"
if [[ -n "${STUB_BLOCK:-}" ]]; then
    touch "$RECORD/torchrun.started"
    for ((tick = 0; tick < 600; tick++)); do
        if [[ -e "$STOP_FILE" ]]; then
            sleep 1
            touch "$RECORD/torchrun.saved"
            exit 0
        fi
        sleep 0.1
    done
    exit 1
fi
""",
    # Records its arguments and environment; a sweep's jobs are listed for real.
    "python": """#!/bin/bash
if [[ "$1 $2" == "-m llmscale.config.sweep" ]]; then
    exec "$REAL_PYTHON" "$@"
fi
printf '%s\\0' "$@" > "$RECORD/python.node$SLURM_NODEID.args"
env -0 > "$RECORD/python.node$SLURM_NODEID.env"
""",
}


def _sbatch_options(script: str) -> Dict[str, str]:
    """The #SBATCH options that sbatch reads: those before the first command."""
    options = {}
    for line in (REPO_ROOT / "launch" / "slurm" / script).read_text().splitlines()[1:]:
        if line and not line.startswith("#"):
            break
        if line.startswith("#SBATCH"):
            key, _, value = line.split(None, 1)[1].partition("=")
            options[key] = value
    return options


def _fake_cluster(tmp_path: Path, script: str, **extra_env: str) -> Dict[str, str]:
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record.mkdir()
    for name, text in STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {
        "PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "RECORD": str(record),
        "REAL_PYTHON": sys.executable,
        "SLURM_JOB_NAME": _sbatch_options(script)["--job-name"], **ALLOCATION, **extra_env,
    }


def _submit(tmp_path: Path, script: str, args: List[str], **extra_env: str):
    env = _fake_cluster(tmp_path, script, **extra_env)
    result = subprocess.run(["bash", f"launch/slurm/{script}", *args], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=60)
    return result, Path(env["RECORD"])


def _render(tmp_path: Path, script: str, args: List[str] = USER_ARGS, **extra_env: str) -> Path:
    result, record = _submit(tmp_path, script, args, **extra_env)
    assert result.returncode == 0, result.stdout + result.stderr
    return record


def _null_separated(path: Path) -> List[str]:
    return path.read_text().split("\0")[:-1]


def _environment(path: Path) -> Dict[str, str]:
    return dict(entry.split("=", 1) for entry in _null_separated(path))


@pytest.mark.parametrize("script", TRAINING_SCRIPTS)
def test_every_node_runs_torchrun_with_its_rank_and_the_first_node_as_master(script, tmp_path):
    record = _render(tmp_path, script)
    assert (record / "scontrol.log").read_text() == "show hostnames gpu-node-[07-08]\n"
    srun = _null_separated(record / "srun.args")
    assert srun[:srun.index("bash")] == [
        "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=96", "--kill-on-bad-exit=1", "--label",
    ]
    job_name = _sbatch_options(script)["--job-name"]
    for node in range(len(HOSTS)):
        assert _null_separated(record / f"torchrun.node{node}.args") == [
            "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=8",
            "--master_addr=gpu-node-07", f"--master_port={20000 + JOB_ID}", "--rdzv_id=requeue0",
            f"--log_dir=runs/slurm/{job_name}-{JOB_ID}/node{node}", "--tee=3",
            "--local_ranks_filter=0", *FIXED_ARGS[script], *USER_ARGS,
        ]


@pytest.mark.parametrize("script", TRAINING_SCRIPTS)
def test_training_overrides_resume_and_yield_to_the_users(script, tmp_path):
    record = _render(tmp_path, script)
    args = _null_separated(record / "torchrun.node1.args")
    overrides = args[args.index("launch/pretrain.py") + 1:]
    cfg = load_config(overrides)
    assert cfg.train.resume == "auto"
    assert cfg.train.max_steps == 20
    assert cfg.train.run_dir == "/scratch/llm runs/$HOME"
    if script == "continued.sbatch":
        assert cfg.checkpoint.interval == 10
        assert load_config([*overrides, "checkpoint.interval=50"]).checkpoint.interval == 50


def test_the_benchmark_runs_once_on_the_first_node(tmp_path):
    """tools/bench.py starts a torchrun per plan itself."""
    record = _render(tmp_path, "bench.sbatch")
    assert _null_separated(record / "python.node0.args") == ["tools/bench.py", *USER_ARGS]
    assert _environment(record / "python.node0.env")["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert sorted(path.name for path in record.iterdir()) == [
        "python.node0.args", "python.node0.env", "scontrol.log"]


def test_each_sweep_task_trains_its_own_combination_in_its_own_folder(tmp_path):
    """Array task 1 of `optim.lr=1e-3,3e-3`: the second value, in <train.run_dir>/1."""
    record = _render(tmp_path, "sweep.sbatch", ["optim.lr=1e-3,3e-3", *USER_ARGS],
                     SLURM_ARRAY_TASK_ID="1")
    stop_file = f"runs/slurm/llmscale-sweep-{JOB_ID}/stop"
    for node in range(len(HOSTS)):
        args = _null_separated(record / f"torchrun.node{node}.args")
        overrides = args[args.index("launch/pretrain.py") + 1:]
        assert overrides == ["train.resume=auto", f"train.stop_file={stop_file}",
                             "optim.lr=0.003", "train.max_steps=20",
                             "train.run_dir='/scratch/llm runs/$HOME/1'"]
    cfg = load_config(overrides)
    assert (cfg.optim.lr, cfg.train.run_dir) == (0.003, "/scratch/llm runs/$HOME/1")


@pytest.mark.parametrize("task, expected", [(None, "sbatch --array=0-<jobs - 1>"),
                                            ("2", "no job 2 in a sweep of 2"),
                                            ("0", "Could not override 'optim.learning_rate'")])
def test_a_sweep_task_without_its_job_fails_before_training(tmp_path, task, expected):
    args = ["optim.lr=1e-3,3e-3"] if task != "0" else ["optim.learning_rate=1e-3,3e-3"]
    result, record = _submit(tmp_path, "sweep.sbatch", args,
                             **({"SLURM_ARRAY_TASK_ID": task} if task else {}))
    assert result.returncode != 0 and expected in result.stderr, result.stderr
    assert not list(record.glob("torchrun.*"))


def test_network_variables_reach_every_node(tmp_path):
    record = _render(tmp_path, "pretrain.sbatch")
    for node in range(len(HOSTS)):
        env = _environment(record / f"torchrun.node{node}.env")
        assert env["SLURM_NODEID"] == str(node)
        assert {key: env[key] for key in (
            "NCCL_IB_TIMEOUT", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_BLOCKING_WAIT",
            "NCCL_DEBUG", "OMP_NUM_THREADS", "MASTER_ADDR", "MASTER_PORT",
        )} == {
            "NCCL_IB_TIMEOUT": "22", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
            "TORCH_NCCL_BLOCKING_WAIT": "0", "NCCL_DEBUG": "WARN", "OMP_NUM_THREADS": "12",
            "MASTER_ADDR": "gpu-node-07", "MASTER_PORT": str(20000 + JOB_ID),
        }
        # Left to NCCL's own choice unless the site names them.
        assert "NCCL_SOCKET_IFNAME" not in env
        assert "CUDA_DEVICE_MAX_CONNECTIONS" not in env


def test_site_settings_and_process_count_override_the_defaults(tmp_path):
    record = _render(tmp_path, "pretrain.sbatch", NCCL_SOCKET_IFNAME="ib0", NCCL_DEBUG="INFO",
                     NPROC_PER_NODE="4", SLURM_RESTART_COUNT="3")
    env = _environment(record / "torchrun.node1.env")
    assert (env["NCCL_SOCKET_IFNAME"], env["NCCL_DEBUG"], env["OMP_NUM_THREADS"]) == (
        "ib0", "INFO", "24")
    args = _null_separated(record / "torchrun.node1.args")
    assert "--nproc_per_node=4" in args
    assert "--rdzv_id=requeue3" in args


def test_usr1_before_the_time_limit_stops_training_with_a_save_then_requeues(tmp_path):
    env = _fake_cluster(tmp_path, "pretrain.sbatch", STUB_BLOCK="1")
    record, output = Path(env["RECORD"]), tmp_path / "job.out"
    stop_file = REPO_ROOT / STOP_FILES["pretrain.sbatch"]
    with output.open("w") as job_output:
        batch = subprocess.Popen(["bash", "launch/slurm/pretrain.sbatch"], cwd=REPO_ROOT, env=env,
                                 stdout=job_output, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (record / "torchrun.started").exists():
            assert batch.poll() is None, output.read_text()
            assert time.monotonic() < deadline, "the stand-in torchrun never started"
            time.sleep(0.05)
        assert not (record / "scontrol.log").read_text().count("requeue")
        # What `#SBATCH --signal=B:USR1@300` does: USR1 to the batch shell alone.
        batch.send_signal(signal.SIGUSR1)
        # The shell asks training to stop through the file, waits for it to save and exit, and
        # only then requeues the job.
        assert batch.wait(timeout=30) == 0, output.read_text()
    finally:
        # Anything left of the session the test started, should the script have failed.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(batch.pid, signal.SIGKILL)
        shutil.rmtree(stop_file.parent, ignore_errors=True)
    assert (record / "torchrun.saved").exists()
    assert (record / "scontrol.log").read_text().splitlines()[-1] == f"requeue {JOB_ID}"
    text = output.read_text()
    assert text.index("save a checkpoint and stop") < text.index(f"requeueing job {JOB_ID}")


@pytest.mark.parametrize("script", SCRIPTS)
def test_sbatch_headers_requeue_signal_and_log(script):
    options = _sbatch_options(script)
    assert {key: options.get(key) for key in (
        "--requeue", "--signal", "--open-mode", "--output", "--ntasks-per-node",
    )} == {
        "--requeue": "", "--open-mode": "append", "--output": "runs/slurm/%x-%j.out",
        "--ntasks-per-node": "1",
        # Only training resumes; a benchmark requeued at its time limit would start over.
        "--signal": None if script == "bench.sbatch" else "B:USR1@300",
    }
    assert re.fullmatch(r"\d+-?\d*:\d\d:\d\d", options["--time"])
    # sbatch ignores #SBATCH lines after the first command: none may hide there.
    text = (REPO_ROOT / "launch" / "slurm" / script).read_text()
    assert text.count("#SBATCH") == len(options)


def _slurm_controller_answers() -> bool:
    if not shutil.which("sbatch"):
        return False
    try:
        return subprocess.run(["sinfo"], capture_output=True, timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.mark.skipif(not _slurm_controller_answers(), reason="no Slurm controller to ask")
@pytest.mark.parametrize("script", SCRIPTS)
def test_slurm_accepts_the_scripts(script):
    result = subprocess.run(["sbatch", "--test-only", f"launch/slurm/{script}"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "to start at" in result.stderr, result.stderr
