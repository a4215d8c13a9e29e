"""Pretrain a model: `deepspeed launch/pretrain.py +exp=tiny key=value ...`.

Also runs under `torchrun --nproc_per_node N` and plain `python` (one process); `--help` says
more."""

import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from llmscale.config import ConfigError, LLMScaleConfig, load_config, to_yaml  # noqa: E402
from llmscale.config.command_line import help_text, parse_command_line  # noqa: E402
from llmscale.config.sweep import run_sweep, sweep_jobs, sweep_yaml  # noqa: E402
from llmscale.parallel.distributed import (  # noqa: E402
    collective_timeout_message, end_distributed, is_collective_timeout, read_world_size,
)

# DeepSpeed's ZeRO calls the old names of torch's collectives; the notice repeats every step.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")

# Errors a user fixes by changing their command, config or files: shown as one message, exit 2.
USER_ERRORS = (ConfigError, FileNotFoundError, NotImplementedError, ValueError)
# A run that stopped itself on a failure while training (an anomaly under train.on_anomaly=stop,
# a collective past train.collective_timeout_s): one message, exit 3.
TRAINING_FAILED = 3


def main(argv) -> int:
    try:
        command = parse_command_line(argv, read_world_size())
        if command.show_help:
            print(help_text())
            return 0
        if command.multirun:
            jobs = sweep_jobs(command.overrides)
            if command.print_config:
                print(sweep_yaml(jobs), end="")
                return 0
            return run_sweep(jobs, [sys.executable, __file__])
        cfg = load_config(command.overrides)
        if command.print_config:
            print(to_yaml(cfg), end="")
            return 0
        return _run(cfg)
    except USER_ERRORS as error:
        if os.environ.get("LLMSCALE_TRACEBACK"):
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"llmscale: error: {error}\n(set LLMSCALE_TRACEBACK=1 for the traceback)",
                  file=sys.stderr)
        return 2


def _run(cfg: LLMScaleConfig) -> int:
    # Imported here, as DeepSpeed, which they load, logs to stdout: --cfg job prints bare YAML.
    from llmscale.train.anomaly import TrainingStopped
    from llmscale.train.dry_run import describe_dry_run
    from llmscale.train.trainer import pretrain

    if cfg.dry_run:
        print(describe_dry_run(cfg))
        return 0
    try:
        pretrain(cfg)
        end_distributed()
        return 0
    except TrainingStopped as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"llmscale: error: {error}", file=sys.stderr)
        return TRAINING_FAILED
    except RuntimeError as error:
        # NotImplementedError, a user error, goes on to main's handler.
        if not is_collective_timeout(error) or os.environ.get("LLMSCALE_TRACEBACK"):
            raise
        # Every rank that waited out the timeout says so: the rank that did not is the culprit.
        print(collective_timeout_message(cfg.train.collective_timeout_s), file=sys.stderr)
        return TRAINING_FAILED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
