"""Document attention: a packed batch must give each document exactly what it gets alone (its
own forward, positions from 0), and nothing may flow between documents."""

import copy
from dataclasses import replace
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from llmscale.config.schema import ModelConfig
from llmscale.data import document_attention_mask, document_position_ids
from llmscale.models import Llama
from llmscale.models.document_attention import (
    document_attention, find_documents, varlen_document_attention,
)
from llmscale.models.llama import token_cross_entropy

EOD = 0
TINY = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
                   vocab_size=64, max_seq_len=32, init_std=0.1)
VARIANTS = {"mha": TINY, "gqa": replace(TINY, num_kv_heads=2)}
# Two samples with different boundaries: documents of 5, 1 (a lone EOD), 4 and 6 tokens, and
# of 9 and 7; the last document of each sample runs past its end, as packing leaves it.
LENGTHS = [[5, 1, 4, 6], [9, 7]]


def packed_batch() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, TINY.vocab_size, (len(LENGTHS), sum(LENGTHS[0])), generator=generator)
    for sample, lengths in enumerate(LENGTHS):
        ends = torch.tensor(lengths).cumsum(0)[:-1] - 1
        ids[sample, ends] = EOD
    return ids


def spans():
    """(sample, start, end) of every document of `packed_batch`."""
    for sample, lengths in enumerate(LENGTHS):
        start = 0
        for length in lengths:
            yield sample, start, start + length
            start += length


def token_losses(model: Llama, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token losses [B, S]."""
    return token_cross_entropy(model.lm_head(model.model(ids)), labels.t()).t()


def packed_and_alone(cfg: ModelConfig):
    torch.manual_seed(0)
    alone = Llama(cfg)
    packed = copy.deepcopy(alone)
    packed.use_document_attention(partial(document_position_ids, eod_id=EOD))
    return packed, alone


@pytest.mark.parametrize("name", VARIANTS)
def test_packed_batch_equals_each_document_alone(name: str) -> None:
    packed, alone = packed_and_alone(VARIANTS[name])
    ids = packed_batch()
    labels = torch.randint(0, TINY.vocab_size, ids.shape, generator=torch.Generator().manual_seed(1))
    packed_losses = token_losses(packed, ids, labels)
    # Gradients of the training loss, the mean over the batch's tokens.
    packed_losses.sum().div(ids.numel()).backward()
    for sample, start, end in spans():
        # Without document attention: one document from position 0 is what plain causal
        # attention sees.
        losses = token_losses(alone, ids[sample:sample + 1, start:end],
                              labels[sample:sample + 1, start:end])
        torch.testing.assert_close(packed_losses[sample, start:end], losses[0],
                                   rtol=0, atol=1e-6)
        losses.sum().div(ids.numel()).backward()  # accumulates over the documents
    for (param_name, ours), theirs in zip(packed.named_parameters(), alone.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=1e-6, msg=param_name)


def test_no_gradient_flows_between_documents() -> None:
    packed, _ = packed_and_alone(VARIANTS["gqa"])
    embedded = []

    def keep_gradient(module, args, output: torch.Tensor) -> None:
        output.retain_grad()
        embedded.append(output)

    packed.model.embed_tokens.register_forward_hook(keep_gradient)
    ids = packed_batch()
    losses = token_losses(packed, ids, ids)
    losses[0, 5:10].sum().backward()  # the loss of sample 0's documents 2 and 3 only
    grad = embedded[0].grad.abs().sum(-1).t()  # [B, S]
    assert (grad[0, 6:10] > 0).all()  # document 3 sees itself...
    assert (grad[0, :5] == 0).all()  # ...but nothing of document 1
    assert (grad[0, 10:] == 0).all() and (grad[1] == 0).all()  # nor later tokens or samples


def test_documents_of_a_batch_are_flattened_sample_by_sample() -> None:
    positions = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 0, 1]])
    documents = find_documents(positions)
    assert documents.cu_seqlens.tolist() == [0, 3, 5, 7, 8, 10]
    assert documents.cu_seqlens.dtype == torch.int32
    assert documents.lengths == [3, 2, 2, 1, 2]


def random_heads(batch: int, heads: int, seq_len: int, dtype=torch.float32, device="cpu"):
    generator = torch.Generator().manual_seed(2)
    return torch.randn(batch, heads, seq_len, 8, generator=generator).to(device, dtype)


def test_cpu_path_equals_a_dense_mask_reference() -> None:
    ids = packed_batch()
    q, k, v = random_heads(2, 4, 16), random_heads(2, 2, 16), random_heads(2, 2, 16)
    reference = F.scaled_dot_product_attention(
        q, k, v, attn_mask=document_attention_mask(ids, EOD).unsqueeze(1), enable_gqa=True)
    documents = find_documents(document_position_ids(ids, EOD))

    def tokens(t: torch.Tensor) -> torch.Tensor:  # [B, h, S, d] -> [B*S, h, d]
        return t.transpose(1, 2).flatten(0, 1)

    out = document_attention(tokens(q), tokens(k), tokens(v), documents, enable_gqa=True)
    torch.testing.assert_close(out, tokens(reference), rtol=0, atol=1e-6)


def test_flash_path_shapes_on_the_meta_device() -> None:
    """The CUDA kernel's call, checked for shapes and dtypes without a GPU."""
    documents = find_documents(document_position_ids(packed_batch(), EOD))
    q = torch.empty(32, 4, 8, dtype=torch.bfloat16, device="meta")
    kv = torch.empty(32, 2, 8, dtype=torch.bfloat16, device="meta")
    out = varlen_document_attention(q, kv, kv, documents, enable_gqa=True)
    assert (out.shape, out.dtype, out.device) == (q.shape, q.dtype, q.device)
