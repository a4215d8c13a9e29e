"""Save and resume a run: the DeepSpeed engine state plus llmscale's own.

One folder per saved step, `<dir>/step_00000100/`. Every rank writes into
`step_00000100.partial/` (DeepSpeed's model, optimizer and scheduler shards, and the rank's
RNG states); once all are done, rank 0 adds the llmscale state, the config and a manifest of
every file's size and checksum, renames the folder to its final name and only then moves the
`latest` pointer. A killed save therefore leaves a `.partial` folder that is never resumed from,
and a checkpoint damaged later fails its manifest check and is skipped.
Frozen parameters (an adapter run's base) are left out: a run makes them again from where it
started (llmscale/checkpoint/frozen_base.py) before it loads a checkpoint.
"""

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist

from llmscale.checkpoint.frozen_base import frozen_parameters_left_out, has_frozen_parameters
from llmscale.checkpoint.manifest import manifest_problem, write_manifest
from llmscale.checkpoint.reshard import (
    check_reshardable, convert_to_universal, declare_universal_info, needs_universal,
    restore_universal,
)
from llmscale.checkpoint.rng import capture_rng_state, restore_rng_state
from llmscale.checkpoint.safe_load import weights_only_loads
from llmscale.checkpoint.state import TrainState
from llmscale.config.load import ConfigError
from llmscale.config.plan import ParallelPlan
from llmscale.config.schema import CheckpointConfig, TrainConfig
from llmscale.files import write_text_atomically

log = logging.getLogger(__name__)

STATE_FILE = "llmscale_state.json"
LATEST_FILE = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def is_checkpoint(path: Path) -> bool:
    return (path / STATE_FILE).is_file()


def _step_dirs(checkpoint_dir: Path) -> List[Path]:
    """Published step folders, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoint_dir.iterdir()
             if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found)]


def find_latest_checkpoint(checkpoint_dir: Path, checksums: bool = True) -> Optional[Path]:
    """The newest complete, intact checkpoint; others are skipped with a warning that says why."""
    for partial in sorted(checkpoint_dir.glob("step_*.partial")):
        log.warning("ignoring %s: a save that was interrupted", partial)
    for path in reversed(_step_dirs(checkpoint_dir)):
        problem = manifest_problem(path, checksums)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s", path, problem)
    return None


def resolve_resume(resume: str, checkpoint_dir: Path, checksums: bool = True) -> Optional[Path]:
    if resume == "none":
        return None
    if resume == "auto":
        return find_latest_checkpoint(checkpoint_dir, checksums)
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(
            f"train.resume={resume}: no such folder. Point it at a checkpoint folder such as "
            f"{checkpoint_dir / step_dir_name(100)}, or use train.resume=auto / none"
        )
    if not is_checkpoint(path):
        latest = find_latest_checkpoint(path, checksums)
        hint = f" (it holds checkpoints: the newest is {latest})" if latest else ""
        raise ConfigError(
            f"train.resume={resume} is not an llmscale checkpoint: it has no {STATE_FILE}{hint}. "
            "Point it at a step_N folder, or use train.resume=auto / none"
        )
    problem = manifest_problem(path, checksums)
    if problem:
        raise ConfigError(
            f"train.resume={resume} cannot be trusted: {problem}. Pick an older checkpoint, or "
            "train.resume=auto to take the newest intact one"
        )
    return path


@dataclass(frozen=True)
class ResumeSource:
    """Where the engine state comes from: the step folder itself, loaded by DeepSpeed, or its
    universal conversion when the parallel layout changed (`saved_pp`: the pipeline size it
    was saved with, which names its parameters; `saved_tp`: the tensor shards of its files)."""

    step_dir: Path
    universal: bool
    saved_pp: int = 1
    saved_tp: int = 1


def prepare_resume(step_dir: Path, plan: ParallelPlan, rank: int) -> ResumeSource:
    """Called on every rank after the process group starts and before the engine is built
    (DeepSpeed's universal load is a config switch)."""
    saved_plan = json.loads((step_dir / STATE_FILE).read_text())["plan"]
    if not needs_universal(saved_plan, plan):
        return ResumeSource(step_dir, universal=False)
    check_reshardable(step_dir, saved_plan, plan)
    if rank == 0:
        print(f"llmscale: {step_dir} was saved with dp={saved_plan['dp']}, tp={saved_plan['tp']}"
              f", pp={saved_plan['pp']} at ZeRO-{saved_plan['zero_stage']}; converting it to a "
              f"universal checkpoint for dp={plan.dp}, tp={plan.tp}, pp={plan.pp} at ZeRO-"
              f"{plan.zero_stage}")
        convert_to_universal(step_dir)
    dist.barrier()
    return ResumeSource(step_dir, universal=True, saved_pp=saved_plan["pp"],
                        saved_tp=saved_plan["tp"])


def check_frozen_base(step_dir: Path, fingerprint: str, train: TrainConfig) -> None:
    """An adapter checkpoint resumes only on the base its adapters were trained on (saved
    before the fingerprint existed: unchecked)."""
    saved = json.loads((step_dir / STATE_FILE).read_text()).get("frozen_base")
    if saved is not None and saved != fingerprint:
        raise ConfigError(
            f"checkpoint {step_dir} holds adapters trained on another frozen base ({saved}) than "
            f"this resume makes ({fingerprint}, from train.init_from={train.init_from}, "
            f"train.seed={train.seed}): resume with the base the run started from (the "
            f"train.init_from and train.seed of {step_dir / 'config.yaml'}), or start a new "
            "run in another train.run_dir"
        )


class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, checkpoint_dir: Path, rank: int,
                 plan: ParallelPlan, config_yaml: str, frozen_base: Optional[str] = None):
        """`frozen_base`: an adapter run's base fingerprint (`frozen_base.base_fingerprint`)."""
        self.cfg = cfg
        self.checkpoint_dir = checkpoint_dir
        self.rank = rank
        self.plan = plan
        self.config_yaml = config_yaml
        self.frozen_base = frozen_base

    def save(self, engine, state: TrainState) -> Path:
        final = self.checkpoint_dir / step_dir_name(state.step)
        partial = final.with_name(final.name + ".partial")
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        dist.barrier()
        # The universal-checkpoint info lets `ds_to_universal` convert this save later.
        declare_universal_info(engine)
        # (DeepSpeed's own exclusion covers ZeRO-2's copy of the frozen parameters.)
        with frozen_parameters_left_out(engine.module):
            engine.save_checkpoint(str(self.checkpoint_dir), tag=partial.name, save_latest=False,
                                   exclude_frozen_parameters=True)
        torch.save(capture_rng_state(), partial / f"rng_rank{self.rank:05d}.pt")
        dist.barrier()
        if self.rank == 0:
            (partial / "config.yaml").write_text(self.config_yaml)
            record = {"train_state": asdict(state), "plan": asdict(self.plan),
                      "versions": _versions()}
            if self.frozen_base:
                record["frozen_base"] = self.frozen_base
            (partial / STATE_FILE).write_text(json.dumps(record, indent=2))
            write_manifest(partial)
            if final.exists():  # the same step saved again after a relaunch
                shutil.rmtree(final)
            os.replace(partial, final)
            write_text_atomically(self.checkpoint_dir / LATEST_FILE, final.name)
            self._prune(final)
        dist.barrier()
        return final

    def _prune(self, newest: Path) -> None:
        """Keep the newest `keep_last` checkpoints plus every step that is a multiple of
        `keep_every`."""
        if not self.cfg.keep_last:
            return
        saved = _step_dirs(self.checkpoint_dir)
        for path in saved[:-self.cfg.keep_last]:
            step = int(_STEP_DIR.match(path.name).group(1))
            if path == newest or (self.cfg.keep_every and step % self.cfg.keep_every == 0):
                continue
            shutil.rmtree(path)

    def load(self, engine, source: ResumeSource) -> TrainState:
        """Resume or roll back. DeepSpeed's loads (engine, optimizer, expert and pipeline-layer
        files) are held to the weights-only unpickler."""
        record = json.loads((source.step_dir / STATE_FILE).read_text())
        with weights_only_loads(source.step_dir):
            if source.universal:
                restore_universal(engine, source, self.plan)
            else:
                # The module state lacks the frozen parameters, which hold their values.
                loaded, _ = engine.load_checkpoint(
                    str(source.step_dir.parent), tag=source.step_dir.name,
                    load_module_strict=not has_frozen_parameters(engine.module),
                    load_optimizer_states=True, load_lr_scheduler_states=True,
                )
                if loaded is None:
                    raise ConfigError(
                        f"DeepSpeed found no engine state in checkpoint {source.step_dir}")
            restore_rng_state(torch.load(self._rng_file(source.step_dir, record),
                                         weights_only=True))
        return TrainState(**record["train_state"])

    def _rng_file(self, step_dir: Path, record: dict) -> Path:
        """This rank's RNG states; after a change of world size, those of the saved rank it
        now stands in for."""
        saved_rank = self.rank % record["plan"]["world_size"]
        return step_dir / f"rng_rank{saved_rank:05d}.pt"


def _versions() -> dict:
    import deepspeed

    import llmscale

    return {"llmscale": llmscale.__version__, "torch": torch.__version__,
            "deepspeed": deepspeed.__version__}
