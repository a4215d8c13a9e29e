"""Mixtral-style mixture-of-experts feed-forward on DeepSpeed's MoE layer.

Routing (DeepSpeed 0.19, `deepspeed.moe.sharded_moe`): the gate is a bias-free linear whose
logits are computed in fp32; softmax over all experts, each token goes to its top-k experts,
and its output is the sum of those experts' outputs weighted by their probabilities,
renormalised over the routes that were kept (k >= 2; with k=1 the weight is the probability).
An expert takes at most `max(ceil(tokens * k * capacity_factor / num_experts), min_capacity)`
of the rank's tokens; the routes beyond that are dropped (a token that loses all its routes
passes through the residual only). For k=2 first choices fill an expert before any second
choice, each in token order; for k>2 an expert keeps its most probable routes; for k=1 a
random subset. The load-balancing loss is `num_experts * sum_e(mean_prob_e * share_e)`, where
share_e is the fraction of tokens whose first choice is e (k <= 2), or the fraction of all
routes that go to e (k > 2).
"""

from typing import Optional

import torch
from deepspeed.moe.layer import MoE
from torch import nn

from llmscale.config.schema import ModelConfig
from llmscale.models.mlp import MLP


class MoEFeedForward(MoE):
    """`num_experts` SwiGLU experts behind a top-k router, in place of the dense `MLP`.

    Parameter names (below this module): the router `deepspeed_moe.gate.wg.weight`
    [num_experts, hidden]; expert i's `deepspeed_moe.experts.deepspeed_experts.{i}.gate_proj.weight`
    (likewise `up_proj`, `down_proj`). With `ep_size` > 1 a rank holds `num_experts // ep_size`
    experts: its local expert i is global expert `ep_rank * (num_experts // ep_size) + i`, the
    numbering DeepSpeed's expert checkpoint files use. DeepSpeed builds the experts as deep
    copies of one `MLP`, so they start identical until the model's `init_weights` draws each
    one's weights. The expert-parallel group is attached by
    `deepspeed.initialize` (`set_deepspeed_parallelism`); outside an engine, call that
    yourself before a forward with `ep_size` > 1.

    A subclass rather than a wrapper, so the names above are the model's names and DeepSpeed's
    engine, which looks for `MoE` modules, finds this one. Its forward returns the output only;
    the auxiliary loss and router statistics of the last forward are kept as attributes:
    `aux_loss` (with grad), `tokens_per_expert` (routes chosen per expert, before the capacity
    limit, over this rank's tokens) and `dropped_tokens` (routes the capacity limit dropped).
    """

    def __init__(self, cfg: ModelConfig, ep_size: int = 1) -> None:
        super().__init__(
            hidden_size=cfg.hidden_size,
            expert=MLP(cfg),
            num_experts=cfg.num_experts,
            ep_size=ep_size,
            k=cfg.moe_top_k,
            capacity_factor=cfg.moe_capacity_factor,
            eval_capacity_factor=cfg.moe_capacity_factor,
            # DeepSpeed's default floor of 4 would raise small micro-batches' capacity above
            # what `moe_capacity_factor` documents.
            min_capacity=0,
            drop_tokens=True,
            use_residual=False,
            # DeepSpeed's default samples the second expert with Gumbel noise; Mixtral takes
            # the two most probable.
            top2_2nd_expert_sampling=False,
        )
        self.aux_loss: Optional[torch.Tensor] = None
        self.tokens_per_expert: Optional[torch.Tensor] = None
        self.dropped_tokens: Optional[torch.Tensor] = None
        # The routing decisions never leave DeepSpeed's MOELayer.forward except as the gate's
        # return value.
        self.deepspeed_moe.gate.register_forward_hook(self._count_dropped)

    def _count_dropped(self, gate: nn.Module, inputs: tuple, routes: tuple) -> None:
        # MOELayer asks the gate for sparse routes: (l_aux, capacity, num_experts,
        # expert index [k, tokens], slot, weight, exp_counts), a dropped route's index being -1.
        expert_index = routes[3]
        self.dropped_tokens = (expert_index < 0).sum().detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output, self.aux_loss, tokens_per_expert = super().forward(x)
        self.tokens_per_expert = tokens_per_expert.detach()
        return output
