"""Wrap a built model in a DeepSpeed engine according to the plan."""

import deepspeed
import torch

from llmscale.config.schema import LLMScaleConfig
from llmscale.config.validate import ParallelPlan
from llmscale.parallel.deepspeed_config import build_deepspeed_config
from llmscale.train.lr_schedule import build_lr_scheduler


def build_optimizer(model: torch.nn.Module, cfg: LLMScaleConfig) -> torch.optim.AdamW:
    """AdamW without weight decay on norm weights (the 1-D parameters), as in Megatron.

    A torch optimizer object is handed to DeepSpeed because naming AdamW in its JSON config
    selects FusedAdam, which JIT-compiles for minutes on CPU."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
    )


def require_trainable(plan: ParallelPlan) -> None:
    """Called before the model is built, so an unsupported plan fails in seconds."""
    if plan.tp > 1 or plan.pp > 1:
        raise NotImplementedError(
            f"parallel.tp={plan.tp}, parallel.pp={plan.pp}: this build trains data-parallel plans "
            "(ZeRO 0-3) only; tensor and pipeline parallel arrive with the 3D-parallelism work. "
            "Use dry_run=true to inspect such a plan."
        )


def build_engine(model: torch.nn.Module, cfg: LLMScaleConfig, plan: ParallelPlan,
                 load_universal: bool = False):
    """`load_universal`: the engine will resume from a universal checkpoint (another layout)."""
    optimizer = build_optimizer(model, cfg)
    scheduler = build_lr_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    config = build_deepspeed_config(cfg, plan)
    if load_universal:
        config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config,
    )
    if plan.dp == 1 and plan.zero_stage == 0:
        # Without ZeRO, DeepSpeed flattens, all-reduces and copies back every gradient each
        # step, even over a group of one rank: measured at 2-3% of a tiny model's step.
        engine.enable_backward_allreduce = False
    return engine
