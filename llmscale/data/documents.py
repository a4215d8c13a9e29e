"""Document boundaries inside packed samples, for models that keep documents apart.

A packed sample concatenates documents, each ending with the EOD id, so the boundaries are in
the token ids themselves: a new document starts after every EOD. These functions turn a batch
of input ids into what attention needs to stop at those boundaries, matching megatron-core's
`reset_position_ids` / `reset_attention_mask` options.
"""

import torch
from torch import Tensor


def document_ids(input_ids: Tensor, eod_id: int) -> Tensor:
    """Per token, the number of its document within the sample (0, 1, ...); an EOD belongs to
    the document it ends. Shape of `input_ids` ([..., seq])."""
    starts = torch.zeros_like(input_ids, dtype=torch.long)
    starts[..., 1:] = (input_ids[..., :-1] == eod_id).long()
    return starts.cumsum(dim=-1)


def document_position_ids(input_ids: Tensor, eod_id: int) -> Tensor:
    """Per token, its position within its own document: counting restarts after every EOD."""
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
    after_eod = torch.zeros_like(input_ids, dtype=torch.bool)
    after_eod[..., 1:] = input_ids[..., :-1] == eod_id
    document_starts = torch.where(after_eod, positions, torch.zeros_like(positions))
    return positions - document_starts.cummax(dim=-1).values


def document_attention_mask(input_ids: Tensor, eod_id: int) -> Tensor:
    """Boolean [..., seq, seq]: True where query i may attend key j (j <= i, same document).
    True-means-attend is the convention of `torch.nn.functional.scaled_dot_product_attention`."""
    documents = document_ids(input_ids, eod_id)
    same_document = documents.unsqueeze(-1) == documents.unsqueeze(-2)
    seq_len = input_ids.shape[-1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=input_ids.device).tril()
    return same_document & causal
