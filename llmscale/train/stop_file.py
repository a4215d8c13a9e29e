"""A graceful stop on request: when `train.stop_file` appears, every rank finishes its step, the
run saves a checkpoint and ends, and a relaunch resumes from it. The SLURM scripts create the
file when Slurm warns that the time limit is near, then requeue the job once training has
exited (a file, not a signal: torchrun ends its workers on signals it does not expect)."""

from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist


class StopFile:
    def __init__(self, path: Optional[str], is_main: bool, device: torch.device) -> None:
        self.path = Path(path) if path else None
        self.is_main = is_main
        self.device = device
        if self.path and is_main:
            # Left over from a stop already honoured: this launch is the resumed run.
            self.path.unlink(missing_ok=True)

    def requested(self) -> bool:
        """The same answer on every rank (rank 0 looks, every rank hears)."""
        if self.path is None:
            return False
        seen = torch.tensor(float(self.is_main and self.path.exists()), device=self.device)
        dist.all_reduce(seen, op=dist.ReduceOp.MAX)
        return bool(seen.item())
