"""Resume on another data-parallel layout through DeepSpeed's universal checkpoint.

A ZeRO checkpoint stores each rank's slice of the flattened optimizer state, so it loads only
into the same number of ranks at the same stage. DeepSpeed's `ds_to_universal` rewrites it as
one file per parameter (weights and Adam moments), which any DP size and ZeRO stage 1 or 2 load.
The conversion is cached in the step folder, beside the files the manifest covers."""

import argparse
import os
import shutil
from pathlib import Path

from llmscale.config.load import ConfigError
from llmscale.config.validate import ParallelPlan

UNIVERSAL_DIR = "universal"


def needs_universal(saved_plan: dict, plan: ParallelPlan) -> bool:
    if saved_plan["zero_stage"] == plan.zero_stage == 0:
        return False  # ZeRO-0 state is whole on every rank: any DP size loads it
    return (saved_plan["dp"], saved_plan["zero_stage"]) != (plan.dp, plan.zero_stage)


def check_reshardable(step_dir: Path, saved_plan: dict, plan: ParallelPlan) -> None:
    if (saved_plan["tp"], saved_plan["pp"]) != (plan.tp, plan.pp):
        raise ConfigError(
            f"checkpoint {step_dir} was saved with tp={saved_plan['tp']}, pp={saved_plan['pp']}; "
            f"this run has parallel.tp={plan.tp}, parallel.pp={plan.pp}. Relaunch with the saved "
            "tensor and pipeline sizes"
        )
    stages = (saved_plan["zero_stage"], plan.zero_stage)
    if not set(stages) <= {1, 2}:
        # ZeRO-0 keeps plain torch optimizer state, outside ZeRO's format. For ZeRO-3, measured
        # with DeepSpeed 0.19.8: the universal files of a ZeRO-3 save do not load into stage
        # 1/2, and a ZeRO-3 engine restores the weights but not the optimizer state exactly (the
        # losses drift from the second step on); llmscale refuses rather than continue a
        # different run.
        raise ConfigError(
            f"checkpoint {step_dir} was saved with dp={saved_plan['dp']} at ZeRO-{stages[0]}; "
            f"this run has dp={plan.dp} at parallel.zero_stage={stages[1]}. Changing the layout "
            "is supported between ZeRO stages 1 and 2 (any number of ranks); relaunch with the "
            f"saved layout (dp={saved_plan['dp']}, parallel.zero_stage={stages[0]}) otherwise"
        )


def convert_to_universal(step_dir: Path) -> Path:
    """Writes `step_dir/universal` once (under a temporary name, then renamed)."""
    from deepspeed.checkpoint import ds_to_universal

    target = step_dir / UNIVERSAL_DIR
    if target.is_dir():
        return target
    partial = step_dir / f"{UNIVERSAL_DIR}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    ds_to_universal.main(argparse.Namespace(
        input_folder=str(step_dir), output_folder=str(partial), num_extract_workers=1,
        num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False,
    ))
    os.replace(partial, target)
    return target
