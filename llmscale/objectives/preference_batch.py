"""A micro-batch of preference pairs through the model: its [B, 2, S] pairs run as 2B sequences
(row 2i the chosen half of pair i, row 2i + 1 the rejected one), the model returns per-token
losses, and each sequence's response log-prob is their sum over the labelled tokens.

`forward` is whatever runs the model, the DeepSpeed engine in a run: (input_ids [R, S],
labels [R, S]) -> per-token losses [S, R] (`Llama.forward(..., per_token=True)`).
"""

from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from llmscale.adapters.lora import adapters_off
from llmscale.config.schema import DPOConfig
from llmscale.models.fused_loss import IGNORE_INDEX
from llmscale.objectives.preference import PreferenceLoss, preference_loss
from llmscale.objectives.sequence_logps import response_lengths, sequence_logps

TokenLosses = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def pair_logps(forward: TokenLosses, inputs: torch.Tensor, labels: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """[B, 2] summed response log-probs (fp32) and [B, 2] response lengths of [B, 2, S] pairs."""
    labels = labels.flatten(0, 1)
    token_losses = forward(inputs.flatten(0, 1), labels)
    response = (labels != IGNORE_INDEX).t()
    return (sequence_logps(token_losses, response).view(-1, 2),
            response_lengths(response).view(-1, 2))


def base_logps(forward: TokenLosses, model: nn.Module, inputs: torch.Tensor,
               labels: torch.Tensor) -> torch.Tensor:
    """[B, 2] response log-probs of an adapter model's frozen base: the same forward with every
    adapter off, without gradients (LoRA's reference, with no second model resident)."""
    with torch.no_grad(), adapters_off(model):
        return pair_logps(forward, inputs, labels)[0]


def micro_batch_preference(forward: TokenLosses, cfg: DPOConfig, inputs: torch.Tensor,
                           labels: torch.Tensor, reference: Optional[torch.Tensor],
                           adapter_model: Optional[nn.Module] = None) -> PreferenceLoss:
    """The `cfg.loss` of [B, 2, S] pairs against their [B, 2] reference log-probs: given, or
    (`adapter_model`) its base's computed here; None for simpo, which has no reference."""
    if adapter_model is not None:
        reference = base_logps(forward, adapter_model, inputs, labels)
    logps, lengths = pair_logps(forward, inputs, labels)
    chosen_reference, rejected_reference = ((None, None) if reference is None
                                            else (reference[:, 0], reference[:, 1]))
    return preference_loss(cfg, logps[:, 0], logps[:, 1], chosen_reference, rejected_reference,
                           lengths[:, 0], lengths[:, 1])


def with_reference(batches: List[Tuple[torch.Tensor, ...]], table: Optional[torch.Tensor]
                   ) -> List[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
    """Micro-batches of (inputs, labels, pair indices) with the indices replaced by the pairs'
    [B, 2] reference log-probs from `table` (None without a reference: simpo)."""
    return [(inputs, labels, None if table is None else table[pairs])
            for inputs, labels, pairs in batches]
