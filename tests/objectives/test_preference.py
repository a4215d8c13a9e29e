"""Preference losses against their published formulas written out here on hand-made
log-probs, the step-0 value ln 2, TRL's metrics, and sequence log-probs from per-token losses."""

import math

import pytest
import torch
from megatron.core import parallel_state
from single_rank import one_rank_process_group

from llmscale.config.schema import DPOConfig, DPOLoss
from llmscale.models.llama import token_cross_entropy
from llmscale.objectives.preference import preference_loss
from llmscale.objectives.sequence_logps import response_lengths, sequence_logps
from llmscale.parallel.megatron_cpu import allow_megatron_layers_on_cpu
from llmscale.parallel.tensor_parallel import vocab_parallel_token_losses

# Three pairs of summed response log-probs: policy and reference, chosen and rejected.
POLICY_CHOSEN = [-12.0, -30.5, -7.25]
POLICY_REJECTED = [-15.0, -29.0, -7.5]
REFERENCE_CHOSEN = [-13.0, -31.0, -7.0]
REFERENCE_REJECTED = [-14.5, -30.0, -8.0]
CHOSEN_LENGTHS = [6, 20, 3]
REJECTED_LENGTHS = [9, 14, 4]


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def dpo_eq7(pw, pl, rw, rl, beta, smoothing=0.0):
    """Rafailov et al. 2023 eq. 7, -log s(b log pi(yw)/ref(yw) - b log pi(yl)/ref(yl)), and its
    conservative form: the same with the labels flipped for a share `smoothing`."""
    z = beta * (pw - rw) - beta * (pl - rl)
    return -(1 - smoothing) * log_sigmoid(z) - smoothing * log_sigmoid(-z)


def ipo_eq17(pw, pl, rw, rl, tau):
    """Azar et al. 2023 eq. 17: (h - 1/(2 tau))^2, h = log (pi(yw) ref(yl)) / (pi(yl) ref(yw))."""
    h = (pw + rl) - (pl + rw)
    return (h - 1 / (2 * tau)) ** 2


def slic_hinge(pw, pl, rw, rl, beta):
    """SLiC's hinge, max(0, delta - log pi(yw)/pi(yl)), on the reference-normalised ratio with
    the margin delta = 1/beta, scaled by beta (TRL's `hinge`)."""
    return beta * max(0.0, 1 / beta - ((pw - rw) - (pl - rl)))


def simpo_eq6(pw, pl, lw, ll, beta, gamma, smoothing=0.0):
    """Meng et al. 2024 eq. 6: -log s(b/|yw| log pi(yw) - b/|yl| log pi(yl) - gamma)."""
    z = beta / lw * pw - beta / ll * pl - gamma
    return -(1 - smoothing) * log_sigmoid(z) - smoothing * log_sigmoid(-z)


def computed(cfg: DPOConfig):
    t = lambda values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
    return preference_loss(cfg, t(POLICY_CHOSEN), t(POLICY_REJECTED), t(REFERENCE_CHOSEN),
                           t(REFERENCE_REJECTED), t(CHOSEN_LENGTHS), t(REJECTED_LENGTHS))


@pytest.mark.parametrize(("cfg", "formula"), [
    (DPOConfig(DPOLoss.sigmoid, beta=0.1), lambda p, b: dpo_eq7(*p[:4], b)),
    (DPOConfig(DPOLoss.sigmoid, beta=0.5, label_smoothing=0.2),
     lambda p, b: dpo_eq7(*p[:4], b, 0.2)),
    (DPOConfig(DPOLoss.ipo, beta=0.25), lambda p, b: ipo_eq17(*p[:4], b)),
    (DPOConfig(DPOLoss.hinge, beta=1.0), lambda p, b: slic_hinge(*p[:4], b)),
    (DPOConfig(DPOLoss.simpo, beta=2.0, simpo_gamma=0.5),
     lambda p, b: simpo_eq6(p[0], p[1], p[4], p[5], b, 0.5)),
    (DPOConfig(DPOLoss.simpo, beta=2.5, simpo_gamma=1.0, label_smoothing=0.1),
     lambda p, b: simpo_eq6(p[0], p[1], p[4], p[5], b, 1.0, 0.1)),
], ids=["dpo", "cdpo", "ipo", "hinge", "simpo", "simpo-smoothed"])
def test_each_loss_is_its_published_formula(cfg, formula):
    pairs = list(zip(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED,
                     CHOSEN_LENGTHS, REJECTED_LENGTHS))
    expected = [formula(pair, cfg.beta) for pair in pairs]
    result = computed(cfg)
    torch.testing.assert_close(result.losses, torch.tensor(expected, dtype=torch.float64))
    assert math.isclose(result.loss.item(), sum(expected) / len(expected), rel_tol=1e-12)
    # The hinge is active on some pairs and not on others, so both branches are checked.
    assert cfg.loss is not DPOLoss.hinge or 0.0 in expected and max(expected) > 0


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_sigmoid_loss_is_ln_2_while_the_policy_is_the_reference(smoothing):
    logps = torch.randn(2, 16, dtype=torch.float64) * 20 - 40
    result = preference_loss(DPOConfig(beta=0.1, label_smoothing=smoothing), logps[0], logps[1],
                             logps[0].clone(), logps[1].clone())
    torch.testing.assert_close(result.losses, torch.full((16,), math.log(2), dtype=torch.float64))
    assert result.metrics()["rewards/accuracies"] == 0  # ties are not counted as right


def test_metrics_are_trls_on_hand_made_values():
    cfg = DPOConfig(beta=0.5)
    # Rewards beta (policy - reference): chosen [0.5, 0], rejected [-0.5, 0.5].
    result = preference_loss(cfg, torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.5]),
                             torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.5]))
    expected = {"rewards/chosen": 0.25, "rewards/rejected": 0.0, "rewards/margins": 0.25,
                "rewards/accuracies": 0.5, "logps/chosen": -1.5, "logps/rejected": -2.25,
                "logps/accuracies": 0.5}
    assert {name: value.item() for name, value in result.metrics().items()} == expected
    simpo = preference_loss(DPOConfig(DPOLoss.simpo, beta=2.0), torch.tensor([-4.0]),
                            torch.tensor([-3.0]), chosen_lengths=torch.tensor([2]),
                            rejected_lengths=torch.tensor([1]))
    # SimPO rewards (TRL's CPO trainer): beta times the length-averaged log-prob.
    assert simpo.metrics()["rewards/chosen"].item() == -4.0
    assert simpo.metrics()["rewards/rejected"].item() == -6.0


def test_the_gradient_flows_to_the_policy_only_through_the_loss():
    policy = torch.tensor([-3.0, -4.0], requires_grad=True)
    result = preference_loss(DPOConfig(beta=1.0), policy[:1], policy[1:], torch.tensor([-3.0]),
                             torch.tensor([-4.0]))
    result.loss.backward()
    # d/dz -log s(z) at z = 0 is -1/2: chosen up, rejected down.
    torch.testing.assert_close(policy.grad, torch.tensor([-0.5, 0.5]))
    assert not result.metrics()["rewards/chosen"].requires_grad


def test_missing_inputs_are_named():
    logps = torch.zeros(1)
    with pytest.raises(ValueError, match="dpo.loss=ipo needs the reference"):
        preference_loss(DPOConfig(DPOLoss.ipo), logps, logps)
    with pytest.raises(ValueError, match="dpo.loss=simpo needs the response lengths"):
        preference_loss(DPOConfig(DPOLoss.simpo), logps, logps, logps, logps)


def test_sequence_logps_sum_the_log_probs_of_the_response_labels():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 3, 11, generator=generator)  # [S, B, V], sequence-first
    labels = torch.randint(0, 11, (7, 3), generator=generator)
    mask = torch.rand(7, 3, generator=generator) > 0.4
    log_probs = logits.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    expected = [sum(log_probs[s, b].item() for s in range(7) if mask[s, b]) for b in range(3)]
    torch.testing.assert_close(sequence_logps(token_cross_entropy(logits, labels), mask),
                               torch.tensor(expected))
    assert response_lengths(mask).tolist() == mask.sum(0).tolist()
    # A prompt position with an infinite loss is dropped, not turned into NaN.
    infinite = token_cross_entropy(logits, labels).masked_fill(~mask, math.inf)
    torch.testing.assert_close(sequence_logps(infinite, mask), torch.tensor(expected))


def test_the_vocabulary_parallel_losses_give_the_same_sequence_logps():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 2, 16, generator=generator)
    labels = torch.randint(0, 16, (5, 2), generator=generator)
    mask = torch.tensor([[0, 0], [1, 0], [1, 1], [1, 1], [0, 1]])
    expected = sequence_logps(token_cross_entropy(logits, labels), mask)
    with one_rank_process_group():
        allow_megatron_layers_on_cpu()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
        # A copy: Megatron's cross-entropy overwrites fp32 logits in place (it keeps their
        # exponentials for the backward pass).
        sharded = sequence_logps(vocab_parallel_token_losses(logits.clone(), labels), mask)
    torch.testing.assert_close(sharded, expected)
