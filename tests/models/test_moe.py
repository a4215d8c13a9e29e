"""MoEFeedForward against a plain-torch top-2 router computed from the same weights."""

import math
from dataclasses import replace
from typing import Iterator, Tuple

import pytest
import torch
import torch.nn.functional as F
from single_rank import one_rank_process_group
from torch import nn

from llmscale.config.schema import ModelConfig
from llmscale.models.moe import MoEFeedForward
from llmscale.train.step_metrics import router_metrics

CFG = ModelConfig(hidden_size=16, intermediate_size=24, num_experts=4, moe_top_k=2)
SEQ, BATCH = 6, 3
TOKENS = SEQ * BATCH
# capacity = ceil(tokens * k * factor / experts): 2.0 gives every expert room for every token.
NO_DROPS = 2.0
# capacity 5 against 9 routes per expert on average: some must drop.
TIGHT = 0.5


@pytest.fixture(scope="module", autouse=True)
def process_group() -> Iterator[None]:
    """`deepspeed.initialize` gives the layers their expert group from it."""
    with one_rank_process_group():
        yield


def moe_layer(capacity_factor: float, seed: int = 0) -> MoEFeedForward:
    torch.manual_seed(seed)
    layer = MoEFeedForward(replace(CFG, moe_capacity_factor=capacity_factor))
    # What the engine does at `deepspeed.initialize`.
    layer.set_deepspeed_parallelism()
    with torch.no_grad():
        # DeepSpeed builds the experts as copies of one module: identical experts would make
        # any routing give the same output.
        for param in layer.parameters():
            param.normal_(0, 0.3)
    return layer


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(SEQ, BATCH, CFG.hidden_size, generator=torch.Generator().manual_seed(seed))


def router_weight(layer: MoEFeedForward) -> torch.Tensor:
    return layer.deepspeed_moe.gate.wg.weight


def swiglu(expert: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up, down = expert.gate_proj.weight, expert.up_proj.weight, expert.down_proj.weight
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def reference(layer: MoEFeedForward, x: torch.Tensor, capacity_factor: float
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-2 routing with a capacity limit written out token by token: returns the output,
    the kept [tokens, 2] mask and the expert choices [tokens, 2]."""
    tokens = x.reshape(-1, CFG.hidden_size)
    probs = F.softmax(tokens @ router_weight(layer).t(), dim=-1)
    top_probs, choice = probs.topk(2, dim=-1)
    capacity = math.ceil(len(tokens) * 2 * capacity_factor / CFG.num_experts)
    # Every token's first choice is seated before any second choice, in token order.
    kept = torch.zeros_like(choice, dtype=torch.bool)
    seated = [0] * CFG.num_experts
    for rank in range(2):
        for token in range(len(tokens)):
            expert = int(choice[token, rank])
            kept[token, rank] = seated[expert] < capacity
            seated[expert] += 1
    # DeepSpeed renormalises the two weights over the routes kept (so they sum to 1 when
    # both are kept, as in Mixtral, and a token left with one route gives it weight 1).
    weights = top_probs * kept
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=torch.finfo(weights.dtype).eps)
    experts = layer.deepspeed_moe.experts.deepspeed_experts
    out = torch.zeros_like(tokens)
    for token in range(len(tokens)):
        for rank in range(2):
            if kept[token, rank]:
                expert = experts[int(choice[token, rank])]
                out[token] = out[token] + weights[token, rank] * swiglu(expert, tokens[token])
    return out.reshape(x.shape), kept, choice


def reference_aux_loss(layer: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """DeepSpeed's top-2 load-balancing loss (GShard's): num_experts x sum over experts of
    (mean router probability) x (fraction of tokens whose first choice it is)."""
    probs = F.softmax(x.reshape(-1, CFG.hidden_size) @ router_weight(layer).t(), dim=-1)
    first_choice_share = F.one_hot(probs.argmax(-1), CFG.num_experts).float().mean(0)
    return CFG.num_experts * (probs.mean(0) * first_choice_share).sum()


@pytest.mark.parametrize("capacity_factor", [NO_DROPS, TIGHT])
def test_output_matches_plain_torch_top2(capacity_factor: float) -> None:
    layer = moe_layer(capacity_factor)
    x = inputs()
    out = layer(x)
    assert out.shape == x.shape
    expected, kept, _ = reference(layer, x, capacity_factor)
    assert bool(kept.all()) == (capacity_factor == NO_DROPS)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_router_statistics_count_routes_and_drops() -> None:
    x = inputs()
    for capacity_factor in (NO_DROPS, TIGHT):
        layer = moe_layer(capacity_factor)
        layer(x)
        _, kept, choice = reference(layer, x, capacity_factor)
        assert layer.tokens_per_expert.tolist() == torch.bincount(
            choice.flatten(), minlength=CFG.num_experts).tolist()
        assert int(layer.tokens_per_expert.sum()) == TOKENS * 2
        assert int(layer.dropped_tokens) == TOKENS * 2 - int(kept.sum())
    assert int(layer.dropped_tokens) > 0


def test_aux_loss_is_deepspeeds_top2_balance_loss() -> None:
    layer = moe_layer(NO_DROPS)
    x = inputs()
    layer(x)
    torch.testing.assert_close(layer.aux_loss, reference_aux_loss(layer, x))


def test_gradients_reach_the_router_and_every_expert() -> None:
    layer = moe_layer(TIGHT)
    x = inputs()
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    loss = (layer(x) * probe).sum() + CFG.moe_aux_loss_coef * layer.aux_loss
    loss.backward()
    ours = {name: p.grad.clone() for name, p in layer.named_parameters()}

    layer.zero_grad()
    expected, _, _ = reference(layer, x, TIGHT)
    ((expected * probe).sum() + CFG.moe_aux_loss_coef * reference_aux_loss(layer, x)).backward()
    assert layer.tokens_per_expert.min() > 0
    for name, p in layer.named_parameters():
        assert ours[name].abs().sum() > 0, name
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_router_metrics_summarise_every_layer() -> None:
    layers = [moe_layer(TIGHT, seed=0), moe_layer(NO_DROPS, seed=3)]
    model = nn.Sequential(*layers)
    assert router_metrics(model) == {}  # nothing has run yet
    x = inputs()
    layer_inputs = (x, layers[0](x).detach())
    model(x)
    metrics = router_metrics(model)

    aux, dropped, loads = [], 0, []
    for layer, layer_input, capacity_factor in zip(layers, layer_inputs, (TIGHT, NO_DROPS)):
        aux.append(reference_aux_loss(layer, layer_input).item())
        _, kept, choice = reference(layer, layer_input, capacity_factor)
        dropped += TOKENS * 2 - int(kept.sum())
        per_expert = torch.bincount(choice.flatten(), minlength=CFG.num_experts)
        loads.append(float(per_expert.max()) / (TOKENS * 2 / CFG.num_experts))
    assert metrics == pytest.approx({
        "moe_aux_loss": sum(aux) / 2,
        "moe_dropped_fraction": dropped / (2 * TOKENS * 2),
        "moe_expert_load_max": max(loads),
    })
    assert 0 < metrics["moe_dropped_fraction"] < 1 and metrics["moe_expert_load_max"] > 1
    assert router_metrics(nn.Linear(2, 2)) == {}
