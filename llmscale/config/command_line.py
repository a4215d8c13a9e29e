"""The pretraining command line (launch/pretrain.py): Hydra overrides, and the options a Hydra
user expects beside them, `--help`, `--cfg job` and `-m`/`--multirun`, read here because the
config is composed without Hydra's application runner (load.py says why)."""

from dataclasses import dataclass, field
from typing import List, Sequence

from llmscale.config.load import ConfigError, config_groups, strip_launcher_args


@dataclass
class PretrainCommand:
    overrides: List[str] = field(default_factory=list)
    show_help: bool = False
    print_config: bool = False  # --cfg job
    multirun: bool = False


def parse_command_line(argv: Sequence[str], world_size: int) -> PretrainCommand:
    """`world_size`: the launcher's. `-m` runs a sweep's jobs as one-process runs, one after
    another, so under a launcher of several ranks each rank would run the whole sweep."""
    command = PretrainCommand()
    args = iter(strip_launcher_args(argv))
    for arg in args:
        if arg in ("-h", "--help"):
            command.show_help = True
        elif arg in ("-m", "--multirun"):
            command.multirun = True
        elif arg in ("-c", "--cfg") or arg.startswith("--cfg="):
            kind = arg.split("=", 1)[1] if "=" in arg else next(args, None)
            if kind != "job":
                raise ConfigError(f"--cfg takes `job` (print the composed config), not {kind!r}: "
                                  "llmscale composes no Hydra runtime config to show")
            command.print_config = True
        else:
            command.overrides.append(arg)
    if command.multirun and world_size > 1 and not command.show_help:
        raise ConfigError(
            f"-m (multirun) runs a sweep's jobs one after another, each as a one-process run, "
            f"and this launcher started {world_size} ranks, each of which would run the whole "
            "sweep. To sweep runs of several ranks, submit a SLURM array with one job a task: "
            "`python -m llmscale.config.sweep OVERRIDE ...` lists the jobs, and "
            "`sbatch --array=0-<jobs - 1> launch/slurm/sweep.sbatch OVERRIDE ...` runs them; "
            "without SLURM, launch one run per value"
        )
    return command


_HELP = """\
Pretrain a Llama-family model.

  python launch/pretrain.py [OPTION ...] [OVERRIDE ...]          one process
  torchrun --nproc_per_node N launch/pretrain.py [OVERRIDE ...]   N ranks
  deepspeed --num_gpus N launch/pretrain.py [OVERRIDE ...]        N ranks

Overrides are Hydra's: key=value sets a setting (train.max_steps=50), group=option picks one of
a group's files (model=125m), +exp=NAME picks a whole experiment.

Options:
  -h, --help      this help
  --cfg job       print the composed config as YAML and exit; trains nothing
  -m, --multirun  a sweep: one run per combination of comma-separated values (optim.lr=1e-3,3e-3;
                  also range(), glob()), one after another, each a one-process run in its own
                  folder, <train.run_dir>/<job number>; on several ranks, a SLURM array:
                  launch/slurm/sweep.sbatch

Experiments (+exp=NAME): {experiments}

Config groups (group=option; * marks the default), the folders of conf/:
{groups}
Every setting and its value: --cfg job; what each means: llmscale/config/schema.py.

Examples:
  python launch/pretrain.py +exp=tiny train.max_steps=50
  python launch/pretrain.py +exp=70b dry_run=true    # validate the plan, report size and memory
  python launch/pretrain.py +exp=tiny model=moe_tiny --cfg job
  python launch/pretrain.py +exp=tiny -m optim.lr=1e-3,3e-3 train.max_steps=100
  torchrun --nproc_per_node 2 launch/pretrain.py +exp=tiny parallel.zero_stage=3"""


def help_text() -> str:
    groups = config_groups()
    experiments, _ = groups.pop("exp")
    width = max(map(len, groups))
    lines = [f"  {group.ljust(width)}  "
             + ", ".join(option + "*" * (option == default) for option in options)
             for group, (options, default) in groups.items()]
    return _HELP.format(experiments=", ".join(experiments), groups="\n".join(lines))
