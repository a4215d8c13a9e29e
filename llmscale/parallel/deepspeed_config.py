"""Generate DeepSpeed's JSON config from the llmscale config: one source of truth."""

from typing import Any, Dict

from llmscale.config.plan import ParallelPlan
from llmscale.config.schema import LLMScaleConfig, Precision

# Large enough that DeepSpeed's own periodic console lines never interleave with ours.
_NEVER = 1 << 30


def build_deepspeed_config(cfg: LLMScaleConfig, plan: ParallelPlan) -> Dict[str, Any]:
    zero: Dict[str, Any] = {"stage": plan.zero_stage}
    if cfg.parallel.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if cfg.parallel.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    config: Dict[str, Any] = {
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum_steps,
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.train.precision == Precision.bf16 and not _autocast(cfg, plan)},
        # llmscale passes a torch AdamW: naming Adam here would make DeepSpeed compile FusedAdam.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
    }
    if _autocast(cfg, plan):
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if plan.pp > 1 and plan.tp > 1:
        # DeepSpeed splits the activations it sends between stages over the tensor-parallel
        # ranks and gathers them on arrival, assuming every such rank holds the same tensor.
        # Under sequence parallelism each holds its own slice of the sequence, so each sends it
        # whole.
        partitioned = not plan.sequence_parallel
        config["pipeline"] = {"pipe_partitioned": partitioned, "grad_partitioned": partitioned}
    return _deep_merge(config, cfg.parallel.deepspeed_extra)


def _autocast(cfg: LLMScaleConfig, plan: ParallelPlan) -> bool:
    """bf16 as torch autocast over fp32 weights, where nothing is sharded. DeepSpeed's bf16 mode
    keeps bf16 weights and wraps the optimizer in a per-parameter loop over fp32 master copies;
    without ZeRO that loop is all it adds, and on one H200 it cost 8-45% of a step (README,
    "Speed on one GPU"). Autocast, with the torch optimizer as it is, is the bare loop's recipe.
    (Pipeline engines keep DeepSpeed's bf16 mode, their tested path.)"""
    return cfg.train.precision == Precision.bf16 and plan.zero_stage == 0 and plan.pp == 1


def _deep_merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
