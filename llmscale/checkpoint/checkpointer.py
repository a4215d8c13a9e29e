"""Save and resume a run: the DeepSpeed engine state plus llmscale's own.

One folder per saved step, `<dir>/step_00000100/`. DeepSpeed writes the model, optimizer and
scheduler shards; each rank adds its RNG states; rank 0 writes `llmscale_state.json` last, once
every rank is done, so a folder without it is an interrupted save and is never resumed from.
"""

import json
import logging
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from llmscale.checkpoint.rng import capture_rng_state, restore_rng_state
from llmscale.config.load import ConfigError
from llmscale.config.validate import ParallelPlan
from llmscale.train.state import TrainState

log = logging.getLogger(__name__)

STATE_FILE = "llmscale_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def is_checkpoint(path: Path) -> bool:
    return (path / STATE_FILE).is_file()


def find_latest_checkpoint(checkpoint_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint; interrupted saves are skipped with a warning."""
    if not checkpoint_dir.is_dir():
        return None
    candidates = sorted(
        (int(match.group(1)), path)
        for path in checkpoint_dir.iterdir()
        if (match := _STEP_DIR.match(path.name)) and path.is_dir()
    )
    for _, path in reversed(candidates):
        if is_checkpoint(path):
            return path
        log.warning("skipping %s: it has no %s (the save was interrupted)", path, STATE_FILE)
    return None


def resolve_resume(resume: str, checkpoint_dir: Path) -> Optional[Path]:
    if resume == "none":
        return None
    if resume == "auto":
        return find_latest_checkpoint(checkpoint_dir)
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(
            f"train.resume={resume}: no such folder. Point it at a checkpoint folder such as "
            f"{checkpoint_dir / step_dir_name(100)}, or use train.resume=auto / none"
        )
    if not is_checkpoint(path):
        latest = find_latest_checkpoint(path)
        hint = f" (it holds checkpoints: the newest is {latest})" if latest else ""
        raise ConfigError(
            f"train.resume={resume} is not an llmscale checkpoint: it has no {STATE_FILE}{hint}. "
            "Point it at a step_N folder, or use train.resume=auto / none"
        )
    return path


class Checkpointer:
    def __init__(self, checkpoint_dir: Path, rank: int, plan: ParallelPlan, config_yaml: str):
        self.checkpoint_dir = checkpoint_dir
        self.rank = rank
        self.plan = plan
        self.config_yaml = config_yaml

    def save(self, engine, state: TrainState) -> Path:
        tag = step_dir_name(state.step)
        path = self.checkpoint_dir / tag
        engine.save_checkpoint(str(self.checkpoint_dir), tag=tag, save_latest=False)
        torch.save(capture_rng_state(), path / f"rng_rank{self.rank:05d}.pt")
        dist.barrier()
        if self.rank == 0:
            (path / "config.yaml").write_text(self.config_yaml)
            record = {"train_state": asdict(state), "plan": asdict(self.plan),
                      "versions": _versions()}
            _write_json_atomically(path / STATE_FILE, record)
        dist.barrier()
        return path

    def load(self, engine, path: Path) -> TrainState:
        record = json.loads((path / STATE_FILE).read_text())
        saved_plan = record["plan"]
        if (saved_plan["world_size"], saved_plan["zero_stage"]) != (
            self.plan.world_size, self.plan.zero_stage
        ):
            raise ConfigError(
                f"checkpoint {path} was saved by {saved_plan['world_size']} ranks at ZeRO-"
                f"{saved_plan['zero_stage']}; this run has {self.plan.world_size} ranks at ZeRO-"
                f"{self.plan.zero_stage}. Relaunch with the saved layout (resharding to another "
                "layout is not supported yet)"
            )
        loaded, _ = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if loaded is None:
            raise ConfigError(f"DeepSpeed found no engine state in checkpoint {path}")
        restore_rng_state(torch.load(path / f"rng_rank{self.rank:05d}.pt", weights_only=True))
        return TrainState(**record["train_state"])


def _write_json_atomically(path: Path, record: dict) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(record, indent=2))
    os.replace(partial, path)


def _versions() -> dict:
    import deepspeed

    import llmscale

    return {"llmscale": llmscale.__version__, "torch": torch.__version__,
            "deepspeed": deepspeed.__version__}
