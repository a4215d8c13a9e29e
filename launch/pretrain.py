"""Pretrain a model: `deepspeed launch/pretrain.py +exp=tiny key=value ...`.

Also runs under `torchrun --nproc_per_node N` and plain `python` (one process)."""

import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmscale.config import ConfigError, load_config, strip_launcher_args  # noqa: E402
from llmscale.train.dry_run import describe_dry_run  # noqa: E402

# DeepSpeed's ZeRO calls the old names of torch's collectives; the notice repeats every step.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")

# Errors a user fixes by changing their command, config or files: shown as one message.
USER_ERRORS = (ConfigError, FileNotFoundError, NotImplementedError, ValueError)


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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
