"""Sweeps: one job per combination of the swept values, each composed up front and given a run
folder of its own."""

import pytest

from llmscale.config import ConfigError, load_config
from llmscale.config.load import expand_sweep
from llmscale.config.sweep import main, sweep_jobs


def test_every_combination_in_the_order_of_hydras_basic_sweeper() -> None:
    assert expand_sweep(["+exp=tiny", "optim.lr=1e-3,3e-3", "train.seed=range(2)"]) == [
        ["+exp=tiny", "optim.lr=0.001", "train.seed=0"],
        ["+exp=tiny", "optim.lr=0.001", "train.seed=1"],
        ["+exp=tiny", "optim.lr=0.003", "train.seed=0"],
        ["+exp=tiny", "optim.lr=0.003", "train.seed=1"],
    ]
    # glob() picks a group's files; overrides that sweep nothing are kept as written.
    assert expand_sweep(["model=glob(*tiny)", "name=${oc.env:USER,me}"]) == [
        ["model=moe_tiny", "name=${oc.env:USER,me}"], ["model=tiny", "name=${oc.env:USER,me}"]]
    with pytest.raises(ConfigError, match="interval"):
        expand_sweep(["optim.lr=interval(0.001,0.003)"])


def test_each_job_trains_in_its_own_folder() -> None:
    jobs = sweep_jobs(["+exp=tiny", "optim.lr=1e-3,3e-3", "checkpoint.dir='/ckpt/it\\'s'"])
    assert [job.overrides for job in jobs] == [
        ["+exp=tiny", "optim.lr=0.001", "train.run_dir='runs/tiny/0'",
         "checkpoint.dir='/ckpt/it\\'s/0'"],
        ["+exp=tiny", "optim.lr=0.003", "train.run_dir='runs/tiny/1'",
         "checkpoint.dir='/ckpt/it\\'s/1'"],
    ]
    for number, job in enumerate(jobs):
        cfg = load_config(job.overrides)
        assert cfg == job.config
        assert (cfg.train.run_dir, cfg.checkpoint.dir) == (f"runs/tiny/{number}",
                                                           f"/ckpt/it's/{number}")
    # A comma in a given folder is a value of the folder, not a sweep, once quoted.
    [job] = sweep_jobs(["train.run_dir='/tmp/a,b'"])
    assert job.config.train.run_dir == load_config(job.overrides).train.run_dir == "/tmp/a,b/0"


def test_a_bad_value_stops_the_sweep_before_any_job(capsys) -> None:
    with pytest.raises(ConfigError, match="train.max_steps"):
        sweep_jobs(["train.max_steps=5,abc"])
    assert main(["train.max_steps=5,abc"]) == 2
    assert "llmscale: error:" in capsys.readouterr().err


def test_the_slurm_array_asks_for_one_job_by_number(capsys) -> None:
    assert main(["+exp=tiny", "optim.lr=1e-3,3e-3"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].startswith("2 job(s); on SLURM: sbatch --array=0-1 ")
    assert listing[2] == "1: +exp=tiny optim.lr=0.003 train.run_dir='runs/tiny/1'"
    assert main(["--job", "1", "+exp=tiny", "optim.lr=1e-3,3e-3"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "+exp=tiny", "optim.lr=0.003", "train.run_dir='runs/tiny/1'"]
    assert main(["--job", "2", "+exp=tiny", "optim.lr=1e-3,3e-3"]) == 2
    assert "no job 2 in a sweep of 2: submit it with sbatch --array=0-1" in capsys.readouterr().err
    assert main(["--job", "x", "+exp=tiny"]) == 2
