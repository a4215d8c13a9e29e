"""A sweep's jobs: one per combination of its swept values (`optim.lr=1e-3,3e-3`), each with a
run folder of its own, `<train.run_dir>/<job number>` (and `<checkpoint.dir>/<job number>` when
the checkpoints live elsewhere), as Hydra numbers a multirun's job folders.

`launch/pretrain.py -m` runs them one after another as one-process runs (`run_sweep`); a SLURM
array runs one a task on as many ranks as it is given (launch/slurm/sweep.sbatch), through

    python -m llmscale.config.sweep [--job N] OVERRIDE ...

which lists the jobs, or with --job N prints job N's overrides one a line.
"""

import subprocess
import sys
from dataclasses import dataclass
from typing import List, Sequence

from llmscale.config.load import ConfigError, expand_sweep, load_config, to_yaml
from llmscale.config.schema import LLMScaleConfig
from llmscale.config.validate import validate


_FOLDER_KEYS = ("train.run_dir", "checkpoint.dir")


@dataclass
class SweepJob:
    overrides: List[str]  # one value for each swept key, then the job's own folders
    config: LLMScaleConfig


def sweep_jobs(overrides: Sequence[str]) -> List[SweepJob]:
    """Every job composed up front, so a bad value stops the sweep before its first run."""
    jobs = []
    for number, combination in enumerate(expand_sweep(overrides)):
        cfg = load_config(combination)
        cfg.train.run_dir = f"{cfg.train.run_dir}/{number}"
        folders = [f"train.run_dir={_quoted(cfg.train.run_dir)}"]
        if cfg.checkpoint.dir:
            cfg.checkpoint.dir = f"{cfg.checkpoint.dir}/{number}"
            folders.append(f"checkpoint.dir={_quoted(cfg.checkpoint.dir)}")
        # The job's own folders replace the ones given, already composed into them.
        kept = [override for override in combination
                if override.split("=", 1)[0] not in _FOLDER_KEYS]
        jobs.append(SweepJob([*kept, *folders], cfg))
    return jobs


def run_sweep(jobs: List[SweepJob], entry_point: Sequence[str]) -> int:
    """Each job as `entry_point + its overrides`, a one-process run in a process of its own (a
    run's process group and memory end with it), one after another. A job that fails (a learning
    rate that diverges) leaves the others to run; the first failure's exit status is returned."""
    for job in jobs:
        validate(job.config, world_size=1)
    statuses = []
    for number, job in enumerate(jobs):
        print(f"llmscale: {_header(number, jobs)}", flush=True)
        statuses.append(subprocess.run([*entry_point, *job.overrides]).returncode)
    failed = [number for number, status in enumerate(statuses) if status]
    if failed:
        print(f"llmscale: error: job(s) {', '.join(map(str, failed))} of the sweep failed",
              file=sys.stderr)
    return next((status for status in statuses if status), 0)


def sweep_yaml(jobs: List[SweepJob]) -> str:
    """Each job's composed config, after a comment naming the job."""
    return "".join(f"# {_header(number, jobs)}\n{to_yaml(job.config)}"
                   for number, job in enumerate(jobs))


def _header(number: int, jobs: List[SweepJob]) -> str:
    return f"job {number} of {len(jobs)}: {' '.join(jobs[number].overrides)}"


def _quoted(value: str) -> str:
    """A Hydra override value taken literally: a comma in a folder name would start a sweep."""
    return "'" + value.replace("'", "\\'") + "'"


def main(argv: Sequence[str]) -> int:
    job_number = None
    if argv[:1] == ["--job"]:
        if len(argv) < 2 or not argv[1].isdigit():
            print("llmscale: error: --job takes a job number (0 for the first)", file=sys.stderr)
            return 2
        job_number, argv = int(argv[1]), argv[2:]
    try:
        jobs = sweep_jobs(argv)
    except ConfigError as error:
        print(f"llmscale: error: {error}", file=sys.stderr)
        return 2
    if job_number is None:
        print(f"{len(jobs)} job(s); on SLURM: sbatch --array=0-{len(jobs) - 1} "
              "launch/slurm/sweep.sbatch with these overrides")
        for number, job in enumerate(jobs):
            print(f"{number}: {' '.join(job.overrides)}")
    elif job_number < len(jobs):
        print("\n".join(jobs[job_number].overrides))
    else:
        print(f"llmscale: error: no job {job_number} in a sweep of {len(jobs)}: submit it with "
              f"sbatch --array=0-{len(jobs) - 1}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
