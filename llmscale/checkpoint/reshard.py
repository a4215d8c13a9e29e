"""Resume on another data-parallel layout through DeepSpeed's universal checkpoint.

A ZeRO checkpoint stores each rank's slice of the flattened optimizer state, so it loads only
into the same number of ranks at the same stage. DeepSpeed's `ds_to_universal` rewrites it as
one file per parameter (weights and Adam moments), which any DP size and ZeRO stage loads:
stages 1-2 through DeepSpeed's universal loader, stage 3 through `restore_universal_into_zero3`.
The conversion is cached in the step folder, beside the files the manifest covers."""

import argparse
import os
import shutil
from pathlib import Path

import torch
from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

from llmscale.checkpoint.safe_load import load_deepspeed_file
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
    # ZeRO-0 keeps plain torch optimizer state, outside ZeRO's format; the universal files of a
    # ZeRO-3 save do not load into stages 1-2 (measured with DeepSpeed 0.19.8).
    if 0 in stages or stages in ((3, 1), (3, 2)):
        raise ConfigError(
            f"checkpoint {step_dir} was saved with dp={saved_plan['dp']} at ZeRO-{stages[0]}; "
            f"this run has dp={plan.dp} at parallel.zero_stage={stages[1]}. Changing the layout "
            "is supported from ZeRO 1 and 2 to ZeRO 1, 2 and 3, and from ZeRO-3 to ZeRO-3 (any "
            f"number of ranks); relaunch with the saved layout (dp={saved_plan['dp']}, "
            f"parallel.zero_stage={stages[0]}) otherwise"
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


def restore_universal_into_zero3(engine, step_dir: Path) -> None:
    """Load `step_dir`'s universal files into a ZeRO-3 engine through DeepSpeed's public
    per-parameter setters; its own ZeRO-3 universal loader leaves the Adam state wrong
    (measured with 0.19.8). Covers what `engine.load_checkpoint` would: weights, Adam moments
    and step, LR schedule, the engine's step counters."""
    zero_dir = step_dir / UNIVERSAL_DIR / "zero"
    optimizer = engine.optimizer
    # torch's AdamW creates its state at the first step; ZeRO-3 needs it before the setters.
    for flat in optimizer.fp32_partitioned_groups_flat:
        if not optimizer.optimizer.state[flat]:
            optimizer.optimizer.state[flat] = {
                "step": torch.tensor(0.0), "exp_avg": torch.zeros_like(flat),
                "exp_avg_sq": torch.zeros_like(flat),
            }
    for name, param in engine.module.named_parameters():
        safe_set_full_fp32_param(param, _universal_tensor(zero_dir / name / "fp32.pt"))
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(param, _universal_tensor(zero_dir / name / f"{key}.pt"),
                                          key)
    adam_step = _universal_tensor(zero_dir / name / "step.pt")
    for state in optimizer.optimizer.state.values():
        state["step"] = adam_step.clone()
    # What DeepSpeed runs after every optimizer step: the fp32 masters into the model's shards.
    for group_index in range(len(optimizer.fp16_groups)):
        optimizer._reassign_or_swap_out_partitioned_parameters(group_index)

    engine_state = load_deepspeed_file(_model_states_file(step_dir))
    engine.lr_scheduler.load_state_dict(engine_state["lr_scheduler"])
    for group, lr in zip(optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
        group["lr"] = lr
    engine.global_steps = engine_state["global_steps"]
    engine.global_samples = engine_state["global_samples"]
    engine.skipped_steps = engine_state["skipped_steps"]


def _universal_tensor(path: Path):
    value = load_deepspeed_file(path)
    return value["param"] if isinstance(value, dict) else value


def _model_states_file(step_dir: Path) -> Path:
    """Rank 0's engine state: `mp_rank_00_model_states.pt` (ZeRO 1-2) or
    `zero_pp_rank_0_mp_rank_00_model_states.pt` (ZeRO-3)."""
    return sorted(step_dir.glob("*mp_rank_00_model_states.pt"))[0]
