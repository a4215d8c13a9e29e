"""Preference losses over sequence log-probabilities of chosen and rejected responses.

With the policy's log-ratio of chosen over rejected, and the reference model's, the margin is
h = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l)). The losses (`dpo.loss`):
- sigmoid: -log sigmoid(beta h) (DPO, Rafailov et al. 2023, eq. 7); with label smoothing e,
  (1 - e) of that plus e times -log sigmoid(-beta h) (conservative DPO, as TRL's
  `label_smoothing`);
- ipo: (h - 1 / (2 beta))^2 (IPO, Azar et al. 2023, eq. 17, on summed log-probs; TRL averages
  them over the response first, which a caller gets by passing averages);
- hinge: max(0, 1 - beta h) (SLiC's hinge on the reference-normalised likelihood, as TRL);
- simpo: -log sigmoid(beta (log pi(y_w) / |y_w| - log pi(y_l) / |y_l|) - gamma), no reference
  (SimPO, Meng et al. 2024, eq. 6), label-smoothed like sigmoid.
Rewards, reported under TRL's metric names, are beta (log pi - log ref) for the reference-based
losses and beta log pi / |y| for simpo, as TRL's DPO and CPO trainers report them. Beside them,
`logps/accuracies` is the share of pairs where the policy's chosen log-prob exceeds its rejected
one: whether the policy prefers the chosen response, not only more than the reference did.
"""

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from llmscale.config.schema import DPOConfig, DPOLoss


@dataclass(frozen=True)
class PreferenceLoss:
    """Per-pair figures [P]; `losses` carry the gradient, the rest are detached."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor

    @property
    def loss(self) -> torch.Tensor:
        return self.losses.mean()

    def metrics(self) -> Dict[str, torch.Tensor]:
        """Means over the pairs, under the names TRL logs (and `logps/accuracies`)."""
        return {name: total / len(self.losses) for name, total in self.sums().items()}

    def sums(self) -> Dict[str, torch.Tensor]:
        """The figures of `metrics` summed over the pairs, to average over several batches."""
        return {
            "rewards/chosen": self.chosen_rewards.sum(),
            "rewards/rejected": self.rejected_rewards.sum(),
            "rewards/margins": (self.chosen_rewards - self.rejected_rewards).sum(),
            "rewards/accuracies": (self.chosen_rewards > self.rejected_rewards).float().sum(),
            "logps/chosen": self.chosen_logps.sum(),
            "logps/rejected": self.rejected_logps.sum(),
            # Ours, not TRL's: the share of pairs whose chosen response the policy itself finds
            # likelier (at step 0, the reference's own preference).
            "logps/accuracies": (self.chosen_logps > self.rejected_logps).float().sum(),
        }


def preference_loss(cfg: DPOConfig, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    reference_chosen: Optional[torch.Tensor] = None,
                    reference_rejected: Optional[torch.Tensor] = None,
                    chosen_lengths: Optional[torch.Tensor] = None,
                    rejected_lengths: Optional[torch.Tensor] = None) -> PreferenceLoss:
    """The `cfg.loss` of P pairs from their [P] summed response log-probs: the reference's for
    sigmoid, ipo and hinge; the response lengths (token counts) for simpo."""
    if cfg.loss is DPOLoss.simpo:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("dpo.loss=simpo needs the response lengths to average log-probs")
        chosen_rewards = cfg.beta * policy_chosen / chosen_lengths
        rejected_rewards = cfg.beta * policy_rejected / rejected_lengths
        losses = _smoothed_sigmoid_loss(chosen_rewards - rejected_rewards - cfg.simpo_gamma,
                                        cfg.label_smoothing)
    else:
        if reference_chosen is None or reference_rejected is None:
            raise ValueError(f"dpo.loss={cfg.loss.value} needs the reference model's log-probs")
        chosen_ratio = policy_chosen - reference_chosen
        rejected_ratio = policy_rejected - reference_rejected
        margin = chosen_ratio - rejected_ratio
        chosen_rewards, rejected_rewards = cfg.beta * chosen_ratio, cfg.beta * rejected_ratio
        if cfg.loss is DPOLoss.sigmoid:
            losses = _smoothed_sigmoid_loss(cfg.beta * margin, cfg.label_smoothing)
        elif cfg.loss is DPOLoss.ipo:
            losses = (margin - 1 / (2 * cfg.beta)) ** 2
        else:
            losses = F.relu(1 - cfg.beta * margin)
    return PreferenceLoss(losses, chosen_rewards.detach(), rejected_rewards.detach(),
                          policy_chosen.detach(), policy_rejected.detach())


def _smoothed_sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return (-(1 - label_smoothing) * F.logsigmoid(logits)
            - label_smoothing * F.logsigmoid(-logits))
