"""Resume on another parallel layout (data-parallel size, ZeRO stage, tensor and pipeline
sizes) through DeepSpeed's universal checkpoint.

A ZeRO checkpoint stores each rank's slice of the flattened optimizer state, so it loads only
into the same layout. DeepSpeed's `ds_to_universal` rewrites it as one folder per parameter
(fp32 weight, Adam moments, step), merging data-parallel slices and, by the patterns saved with
each checkpoint (`universal_checkpoint_info`), tensor-parallel shards. It holds only what the
optimizer holds, which is all a checkpoint holds: an adapter run's frozen base is never saved.
Folders of a pipeline-parallel save carry stage names (`3.layer.mlp.up_proj.weight`), which
map back to the model's own names. `restore_universal` then hands every rank its share of each
parameter through DeepSpeed's per-parameter setters, for ZeRO 1, 2 and 3 alike. (DeepSpeed's
own universal loader needs the parameter names of both layouts to agree, which a pipeline does
not give; at ZeRO-3 it leaves the Adam state wrong; and it cannot read a ZeRO-3 save's
conversion into stages 1-2: all measured with 0.19.8.)
The conversion is cached in the step folder, beside the files the manifest covers."""

import argparse
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Dict, Iterable, List

import torch
from deepspeed.checkpoint.constants import (
    PARAMETER_WITH_ROW_PARALLELISM_PATTERNS, TP_REPLICATED_PARAMETER_PATTERNS,
    UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)
from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

from llmscale.checkpoint.safe_load import load_deepspeed_file, weights_only_loads
from llmscale.config.load import ConfigError
from llmscale.config.plan import ParallelPlan
from llmscale.parallel.pipeline import canonical_name
from llmscale.parallel.tensor_parallel import local_shard

UNIVERSAL_DIR = "universal"

# How tensor-parallel shards merge (DeepSpeed matches each pattern from the start of the
# parameter name): row-parallel weights along their input dimension, replicated ones kept once,
# everything else along the output dimension. A LoRA adapter follows its projection's split:
# B of a column-parallel projection and A of a row-parallel one are split, the other replicated.
_COLUMN, _ROW = "(q_proj|k_proj|v_proj|gate_proj|up_proj)", "(o_proj|down_proj)"
TP_REPLICATED = [r".*norm\.weight$", rf".*{_COLUMN}\.lora_A\.weight$",
                 rf".*{_ROW}\.lora_B\.weight$"]
ROW_PARALLEL = [rf".*{_ROW}\.weight$", rf".*{_ROW}\.lora_A\.weight$"]


def universal_info(trained_names: Iterable[str]) -> dict:
    """Saved with every checkpoint, so that `ds_to_universal` can merge tensor-parallel shards.
    It merges only what the optimizer holds, and refuses a pattern that matches none of it
    (a LoRA run trains no norm), so only the patterns of trained parameters are named."""
    names = list(trained_names)

    def used(patterns: List[str]) -> List[str]:
        return [pattern for pattern in patterns if any(re.match(pattern, n) for n in names)]

    return {
        UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        TP_REPLICATED_PARAMETER_PATTERNS: used(TP_REPLICATED),
        PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: used(ROW_PARALLEL),
    }


def declare_universal_info(engine) -> None:
    """Hands `universal_info` to DeepSpeed the way its own tensor-parallel code does: as an
    attribute of the engine's module, which both its dense and its MoE save paths write into the
    model-states file (the MoE path refuses the key in `client_state`)."""
    trained = (name for name, param in engine.module.named_parameters() if param.requires_grad)
    setattr(engine.module, UNIVERSAL_CHECKPOINT_INFO, universal_info(trained))


def needs_universal(saved_plan: dict, plan: ParallelPlan) -> bool:
    if (saved_plan["tp"], saved_plan["pp"]) != (plan.tp, plan.pp):
        return True
    if saved_plan["zero_stage"] == plan.zero_stage == 0:
        return False  # ZeRO-0 state is whole on every rank: any DP size loads it
    return (saved_plan["dp"], saved_plan["zero_stage"]) != (plan.dp, plan.zero_stage)


def check_reshardable(step_dir: Path, saved_plan: dict, plan: ParallelPlan) -> None:
    saved = (f"dp={saved_plan['dp']}, tp={saved_plan['tp']}, pp={saved_plan['pp']} at ZeRO-"
             f"{saved_plan['zero_stage']}")
    relaunch = (f"relaunch with the saved layout (parallel.dp={saved_plan['dp']}, parallel.tp="
                f"{saved_plan['tp']}, parallel.pp={saved_plan['pp']}, parallel.zero_stage="
                f"{saved_plan['zero_stage']})")
    if saved_plan.get("ep", 1) != plan.ep:
        raise ConfigError(
            f"checkpoint {step_dir} was saved with parallel.ep={saved_plan.get('ep', 1)}; this run "
            f"has parallel.ep={plan.ep}: changing the expert-parallel size is not supported; "
            f"{relaunch}"
        )
    # ZeRO-0 keeps plain torch optimizer state, outside ZeRO's format.
    if 0 in (saved_plan["zero_stage"], plan.zero_stage):
        raise ConfigError(
            f"checkpoint {step_dir} was saved with {saved}; this run has dp={plan.dp}, tp="
            f"{plan.tp}, pp={plan.pp} at parallel.zero_stage={plan.zero_stage}. Changing the "
            f"layout is supported between ZeRO stages 1, 2 and 3 (any dp, tp, pp); {relaunch} "
            "otherwise"
        )


def convert_to_universal(step_dir: Path) -> Path:
    """Writes `step_dir/universal` once (under a temporary name, then renamed)."""
    from deepspeed.checkpoint import ds_to_universal

    target = step_dir / UNIVERSAL_DIR
    if target.is_dir():
        return target
    partial = step_dir / f"{UNIVERSAL_DIR}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    with weights_only_loads(step_dir):
        ds_to_universal.main(argparse.Namespace(
            input_folder=str(step_dir), output_folder=str(partial), num_extract_workers=1,
            num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False,
        ))
    os.replace(partial, target)
    return target


def universal_parameter_dirs(step_dir: Path, saved_pp: int) -> Dict[str, Path]:
    """The converted checkpoint's folder of each parameter, by the model's own (Hugging Face)
    parameter name."""
    zero_dir = step_dir / UNIVERSAL_DIR / "zero"
    naming = _model_naming(saved_pp)
    return {naming(path.name): path for path in zero_dir.iterdir() if path.is_dir()}


def restore_universal(engine, source, plan: ParallelPlan) -> None:
    """Load the universal files of `source` (a `ResumeSource`) into an engine of any ZeRO
    stage >= 1 and any tensor and pipeline sizes. Covers what `engine.load_checkpoint` would:
    weights, Adam moments and step, LR schedule, the engine's step counters."""
    step_dir, saved_pp = source.step_dir, source.saved_pp
    folders = universal_parameter_dirs(step_dir, saved_pp)
    naming = _model_naming(plan.pp)
    optimizer = engine.optimizer
    zero3 = plan.zero_stage == 3
    flat_masters = (optimizer.fp32_partitioned_groups_flat if zero3
                    else optimizer.single_partition_of_fp32_groups)
    # torch's AdamW creates its state at the first step; the setters need it before.
    for flat in flat_masters:
        if not optimizer.optimizer.state[flat]:
            optimizer.optimizer.state[flat] = {
                "step": torch.tensor(0.0), "exp_avg": torch.zeros_like(flat),
                "exp_avg_sq": torch.zeros_like(flat),
            }
    if not zero3:
        optimizer._lazy_init_hp_params_optimizer_state()  # points each weight at its moments
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:  # an adapter run's base, made again before the load
            continue
        folder = folders.get(naming(name))
        if folder is None:
            raise ConfigError(f"checkpoint {step_dir} has no parameter {naming(name)}: it holds "
                              "another model; resume it with the config it was saved with")
        safe_set_full_fp32_param(param, local_shard(param, universal_tensor(folder / "fp32.pt")))
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(
                param, local_shard(param, universal_tensor(folder / f"{key}.pt")), key)
    adam_step = _adam_step(step_dir, folder)
    for state in optimizer.optimizer.state.values():
        state["step"] = adam_step.clone()
    # What DeepSpeed runs after every optimizer step: the fp32 masters into the model's weights.
    if zero3:
        for group_index in range(len(optimizer.fp16_groups)):
            optimizer._reassign_or_swap_out_partitioned_parameters(group_index)
    else:
        optimizer.update_lp_params()

    engine_state = load_deepspeed_file(_model_states_file(step_dir))
    engine.lr_scheduler.load_state_dict(engine_state["lr_scheduler"])
    for group, lr in zip(optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
        group["lr"] = lr
    engine.global_steps = engine_state["global_steps"]
    engine.global_samples = engine_state["global_samples"]
    engine.skipped_steps = engine_state["skipped_steps"]


def _model_naming(pp: int) -> Callable[[str], str]:
    """The model's own parameter name of a parameter of a layout with `pp` stages."""
    return canonical_name if pp > 1 else _same_name


def _same_name(name: str) -> str:
    return name


def universal_tensor(path: Path):
    value = load_deepspeed_file(path)
    return value["param"] if isinstance(value, dict) else value


def _adam_step(step_dir: Path, parameter_dir: Path) -> torch.Tensor:
    """Adam's step count: one file per parameter from ZeRO 1-2 saves; a ZeRO-3 save's
    conversion keeps it in the optimizer's global state only."""
    if (parameter_dir / "step.pt").is_file():
        return universal_tensor(parameter_dir / "step.pt")
    global_state = load_deepspeed_file(step_dir / UNIVERSAL_DIR / "zero" / "optimizer_state.pt")
    return next(iter(global_state["optimizer_state_dict"]["state"].values()))["step"]


def _model_states_file(step_dir: Path) -> Path:
    """Rank 0's engine state: `mp_rank_00_model_states.pt` (ZeRO 1-2) or
    `zero_pp_rank_0_mp_rank_00_model_states.pt` (ZeRO-3)."""
    return sorted(step_dir.glob("*mp_rank_00_model_states.pt"))[0]
