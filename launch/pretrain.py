"""Pretrain a model: `deepspeed launch/pretrain.py +exp=tiny key=value ...`.

Also runs under `torchrun --nproc_per_node N` and plain `python` (one process)."""

import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from llmscale.config import ConfigError, load_config, strip_launcher_args  # noqa: E402
from llmscale.parallel.distributed import (  # noqa: E402
    collective_timeout_message, is_collective_timeout,
)
from llmscale.train.anomaly import TrainingStopped  # noqa: E402
from llmscale.train.dry_run import describe_dry_run  # noqa: E402

# DeepSpeed's ZeRO calls the old names of torch's collectives; the notice repeats every step.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")

# Errors a user fixes by changing their command, config or files: shown as one message, exit 2.
USER_ERRORS = (ConfigError, FileNotFoundError, NotImplementedError, ValueError)
# A run that stopped itself on a failure while training (an anomaly under train.on_anomaly=stop,
# a collective past train.collective_timeout_s): one message, exit 3.
TRAINING_FAILED = 3


def main(argv) -> int:
    try:
        cfg = load_config(strip_launcher_args(argv))
        if cfg.dry_run:
            print(describe_dry_run(cfg))
            return 0
        from llmscale.train.trainer import pretrain

        pretrain(cfg)
        return 0
    except USER_ERRORS as error:
        if os.environ.get("LLMSCALE_TRACEBACK"):
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"llmscale: error: {error}\n(set LLMSCALE_TRACEBACK=1 for the traceback)",
                  file=sys.stderr)
        return 2
    except TrainingStopped as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"llmscale: error: {error}", file=sys.stderr)
        return TRAINING_FAILED
    except RuntimeError as error:
        if not is_collective_timeout(error) or os.environ.get("LLMSCALE_TRACEBACK"):
            raise
        # Every rank that waited out the timeout says so: the rank that did not is the culprit.
        print(collective_timeout_message(cfg.train.collective_timeout_s), file=sys.stderr)
        return TRAINING_FAILED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
