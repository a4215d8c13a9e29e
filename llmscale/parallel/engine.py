"""Wrap a built model in a DeepSpeed engine according to the plan."""

import deepspeed
import torch

from llmscale.config.plan import ParallelPlan
from llmscale.config.schema import LLMScaleConfig
from llmscale.optim.lr_schedule import build_lr_scheduler
from llmscale.optim.optimizer import build_optimizer
from llmscale.parallel.deepspeed_config import build_deepspeed_config
from llmscale.parallel.topology import DeepSpeedGroups


def build_engine(model: torch.nn.Module, cfg: LLMScaleConfig, plan: ParallelPlan):
    optimizer = build_optimizer(model, cfg, plan)
    scheduler = build_lr_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    config = build_deepspeed_config(cfg, plan)
    # A pipeline module brings its own topology; otherwise tensor parallelism needs DeepSpeed
    # to take its data-parallel group from Megatron's grid rather than the whole world.
    mpu = DeepSpeedGroups() if plan.tp > 1 and plan.pp == 1 else None
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config, mpu=mpu,
    )
    if plan.dp == 1 and plan.zero_stage == 0:
        # Without ZeRO, DeepSpeed flattens, all-reduces and copies back every gradient each
        # step, even over a group of one rank: measured at 2-3% of a tiny model's step.
        engine.enable_backward_allreduce = False
    return engine
