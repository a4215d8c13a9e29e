"""The AdamW every plan trains with."""

import torch
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

from llmscale.config.plan import ParallelPlan
from llmscale.config.schema import LLMScaleConfig


def build_optimizer(model: torch.nn.Module, cfg: LLMScaleConfig,
                    plan: ParallelPlan) -> torch.optim.AdamW:
    """AdamW without weight decay on norm weights (the 1-D parameters), as in Megatron; torch's
    fused kernel where the plan says so (checked at the first step, once the parameters sit on
    their device).

    A torch optimizer object is handed to DeepSpeed because naming AdamW in its JSON config
    selects FusedAdam, which JIT-compiles for minutes on CPU."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"name": "decay", "params": decay, "weight_decay": cfg.optim.weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    # ZeRO drops an empty group (LoRA trains no 1-D parameter), which the LR scheduler, built
    # on this optimizer, would then miss.
    groups = [group for group in groups if group["params"]]
    if cfg.model.num_experts:
        # Expert weights get groups of their own: DeepSpeed reduces their gradients over the
        # ranks holding the same experts, not the whole data-parallel group.
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return torch.optim.AdamW(
        groups,
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
        fused=plan.fused_optimizer or None,  # None: torch's default kernel choice
    )
