"""launch/pretrain.py's options beside the Hydra overrides, as a user types them: `--help`,
`--cfg job`, and `-m` sweeps (refused under a launcher of several ranks)."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List

import pytest
import yaml
from launching import REPO_ROOT, clean_env, launch, metrics


def _pretrain(args: List[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/pretrain.py", *args], cwd=REPO_ROOT,
                          env={**clean_env(), **env}, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> Dict[str, subprocess.CompletedProcess]:
    """Each command once, side by side: each spends seconds importing torch."""
    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    commands = {
        "help": (["--help"], {}),
        "cfg": (["+exp=tiny", "--cfg", "job", "train.max_steps=7", f"train.run_dir={run_dir}"],
                {}),
        "sweep-on-2-ranks": (["+exp=tiny", "-m", "optim.lr=1e-3,3e-3",
                              f"train.run_dir={run_dir}"], {"WORLD_SIZE": "2", "RANK": "0"}),
    }
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        results = dict(zip(commands, pool.map(lambda c: _pretrain(c[0], **c[1]),
                                              commands.values())))
    # None of them trained, or made a run folder.
    assert not run_dir.exists()
    return results


def test_help_lists_groups_experiments_and_examples(outcomes) -> None:
    result = outcomes["help"]
    assert result.returncode == 0, result.stderr
    assert "  model       125m, 13b, 1_3b, 1b, 70b, 7b, mixtral_8x7b" in result.stdout
    assert "Experiments (+exp=NAME): 125m, 13b, 1_3b, 1b, 70b, 7b, continued_smollm2, " in \
        result.stdout
    assert "Examples:" in result.stdout and "not dashed flags" not in result.stderr


def test_cfg_job_prints_the_composed_config_as_yaml(outcomes) -> None:
    result = outcomes["cfg"]
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert config["name"] == "tiny" and config["train"]["max_steps"] == 7
    assert config["model"]["hidden_size"] == 128


def test_a_sweep_under_a_launcher_of_two_ranks_is_refused_with_the_way_there(outcomes) -> None:
    result = outcomes["sweep-on-2-ranks"]
    assert result.returncode == 2
    assert "llmscale: error: -m (multirun)" in result.stderr
    assert "launch/slurm/sweep.sbatch" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_sweep_trains_each_value_in_its_own_folder(tmp_path: Path) -> None:
    output = launch("python", tmp_path, "-m", "optim.lr=1e-3,3e-3", "train.max_steps=2",
                    "train.eval_interval=2", "train.eval_batches=1", "checkpoint.save_final=false")
    assert "llmscale: job 0 of 2: " in output and "llmscale: job 1 of 2: " in output
    assert sorted(path.name for path in tmp_path.iterdir()) == ["0", "1"]
    for number, lr in enumerate((1e-3, 3e-3)):
        run_dir = tmp_path / str(number)
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == lr
        assert sorted(metrics(run_dir, "loss")) == [1, 2]
