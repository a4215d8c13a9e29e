"""Causal attention that keeps the documents of packed samples apart (block-diagonal causal).

The boundaries come as position ids [B, S] that restart at 0 with every document (a sample
starts with one too), e.g. `llmscale.data.document_position_ids`. The kernels take the tokens
batch-major and flattened, [B*S, heads, head_dim], with `cu_seqlens` marking where each
document starts: the variable-length layout of flash attention. No S x S mask is ever built:
on CUDA in half precision one varlen flash call runs all documents; elsewhere (CPU, fp32) each
document is a slice and gets its own causal SDPA call, so memory stays linear in S.
"""

from dataclasses import dataclass
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.varlen import varlen_attn

# The dtypes flash attention's varlen kernel takes.
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class Documents:
    """Where the documents of a batch lie, computed once per forward and shared by the layers."""

    # [B, S]: each token's position within its document, for RoPE.
    position_ids: Tensor
    # int32 [N + 1]: the start of each of the batch's N documents in the flattened B*S tokens,
    # then B*S.
    cu_seqlens: Tensor
    # The N document lengths, on the host: slicing and the varlen kernel's maximum need them.
    lengths: List[int]


def find_documents(position_ids: Tensor) -> Documents:
    flat = position_ids.flatten()
    starts = (flat == 0).nonzero().flatten()
    cu_seqlens = torch.cat((starts, starts.new_tensor([flat.numel()]))).to(torch.int32)
    return Documents(position_ids, cu_seqlens, cu_seqlens.diff().tolist())


def document_attention(q: Tensor, k: Tensor, v: Tensor, documents: Documents,
                       enable_gqa: bool) -> Tensor:
    """Causal attention within each document of q [T, heads, d], k/v [T, kv_heads, d] (T = B*S,
    batch-major); the result is shaped like q."""
    if q.is_cuda and q.dtype in _FLASH_DTYPES:
        return varlen_document_attention(q, k, v, documents, enable_gqa)
    return sliced_document_attention(q, k, v, documents, enable_gqa)


def varlen_document_attention(q: Tensor, k: Tensor, v: Tensor, documents: Documents,
                              enable_gqa: bool) -> Tensor:
    """One flash-attention call over every document (CUDA, fp16/bf16)."""
    cu_seqlens, max_len = documents.cu_seqlens.to(q.device), max(documents.lengths)
    # window (-1, 0): no limit to the left, nothing to the right, i.e. causal.
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, window_size=(-1, 0),
                       enable_gqa=enable_gqa)


def sliced_document_attention(q: Tensor, k: Tensor, v: Tensor, documents: Documents,
                              enable_gqa: bool) -> Tensor:
    """One causal SDPA call per document slice, any device and dtype."""

    def heads_first(t: Tensor) -> Tensor:
        # [1, heads, length, d]: SDPA's fused CPU kernel takes 4-d inputs only; 3-d ones fall
        # back to the unfused math, 2-3x slower.
        return t.transpose(0, 1).unsqueeze(0)

    outputs = [
        F.scaled_dot_product_attention(
            heads_first(q_doc), heads_first(k_doc), heads_first(v_doc), is_causal=True,
            enable_gqa=enable_gqa,
        )[0].transpose(0, 1)
        for q_doc, k_doc, v_doc in zip(*(t.split(documents.lengths) for t in (q, k, v)))
    ]
    return torch.cat(outputs)
