"""Per-sequence log-probabilities of a response, from the model's per-token losses.

Both loss paths of the model give the per-token cross-entropy -log p(label), sequence-first
[S, B]: `llmscale.models.llama.token_cross_entropy` on full logits and
`llmscale.parallel.tensor_parallel.vocab_parallel_token_losses` on vocabulary shards (Megatron's
`vocab_parallel_cross_entropy`). So one function over per-token losses serves both, on the last
pipeline stage, and no [tokens, vocab] log-softmax has to be kept.
"""

import torch


def sequence_logps(token_losses: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """[S, B] per-token -log p(label) and the [S, B] mask of the labels that are response
    tokens -> [B] log p(response | prompt), the sum over the masked tokens, in fp32.
    Unmasked positions are dropped, not multiplied by 0, so an infinite loss there (a padding
    label) cannot turn the sum into NaN."""
    kept = torch.where(response_mask.bool(), token_losses.float(), 0.0)
    return -kept.sum(dim=0)


def response_lengths(response_mask: torch.Tensor) -> torch.Tensor:
    """[B] the number of response tokens of each sequence of an [S, B] mask (SimPO's |y|)."""
    return response_mask.bool().sum(dim=0)
