"""Expert parallelism applied to a built MoE `Llama`: each rank keeps num_experts / ep of every
layer's experts (DeepSpeed's MoE layer sends each token to the rank holding its expert and
back); the router and everything outside the experts stay data-parallel."""

import torch
import torch.distributed as dist

from llmscale.models.llama import Llama
from llmscale.models.moe import MoEFeedForward


@torch.no_grad()
def apply_expert_parallel(model: Llama, ep: int) -> None:
    """`model` holds every expert (built with ep_size 1, the same on every rank)."""
    # DeepSpeed's expert-parallel groups are runs of `ep` consecutive ranks (without tensor or
    # pipeline parallelism, which MoE models do not combine with here).
    ep_rank = dist.get_rank() % ep
    for layer in model.model.layers:
        full = layer.mlp.deepspeed_moe
        sharded = MoEFeedForward(model.cfg, ep_size=ep)
        sharded.deepspeed_moe.gate.load_state_dict(full.gate.state_dict())
        local_experts = sharded.deepspeed_moe.experts.deepspeed_experts
        for index, expert in enumerate(local_experts):
            expert.load_state_dict(
                full.experts.deepspeed_experts[ep_rank * len(local_experts) + index].state_dict())
        layer.mlp = sharded
