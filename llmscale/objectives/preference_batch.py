"""A micro-batch of preference pairs through the model: its [B, 2, S] pairs run as 2B sequences
(row 2i the chosen half of pair i, row 2i + 1 the rejected one), the model returns per-token
losses, and each sequence's response log-prob is their sum over the labelled tokens.

`forward` is whatever runs the model, the DeepSpeed engine in a run: (input_ids [R, S],
labels [R, S]) -> per-token losses [S, R] (`Llama.forward(..., per_token=True)`). A pipeline's
last stage has the per-token losses alone, and starts from `sequence_pair_logps`.
"""

from typing import Callable, List, Optional, Tuple

import torch

from llmscale.config.schema import DPOConfig
from llmscale.models.fused_loss import IGNORE_INDEX
from llmscale.objectives.preference import PreferenceLoss, preference_loss
from llmscale.objectives.sequence_logps import response_lengths, sequence_logps

TokenLosses = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# A micro-batch of pairs: input ids and labels [B, 2, S], reference log-probs [B, 2] (or None).
PairBatch = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]
# A micro-batch's [B, 2] summed response log-probs (fp32) and [B, 2] response lengths.
PairLogps = Tuple[torch.Tensor, torch.Tensor]


def pair_logps(forward: TokenLosses, inputs: torch.Tensor, labels: torch.Tensor) -> PairLogps:
    """The log-probs and lengths of [B, 2, S] pairs."""
    labels = labels.flatten(0, 1)
    return sequence_pair_logps(forward(inputs.flatten(0, 1), labels), labels)


def sequence_pair_logps(token_losses: torch.Tensor, labels: torch.Tensor) -> PairLogps:
    """The log-probs and lengths of the pairs of 2B sequences, from their per-token losses
    [S, 2B] and labels [2B, S]."""
    response = (labels != IGNORE_INDEX).t()
    return (sequence_logps(token_losses, response).view(-1, 2),
            response_lengths(response).view(-1, 2))


def pair_preference(cfg: DPOConfig, logps: PairLogps, reference: Optional[torch.Tensor]
                    ) -> PreferenceLoss:
    """The `cfg.loss` of a micro-batch's pairs from their log-probs and lengths and their [B, 2]
    reference log-probs (None for simpo, which has no reference)."""
    (chosen, rejected), (chosen_lengths, rejected_lengths) = logps[0].t(), logps[1].t()
    chosen_reference, rejected_reference = (None, None) if reference is None else reference.t()
    return preference_loss(cfg, chosen, rejected, chosen_reference, rejected_reference,
                           chosen_lengths, rejected_lengths)


def with_reference(batches: List[Tuple[torch.Tensor, ...]], table: Optional[torch.Tensor]
                   ) -> List[PairBatch]:
    """Micro-batches of (inputs, labels, pair indices) with the indices replaced by the pairs'
    [B, 2] reference log-probs from `table` (None without a reference: simpo)."""
    return [(inputs, labels, None if table is None else table[pairs])
            for inputs, labels, pairs in batches]
