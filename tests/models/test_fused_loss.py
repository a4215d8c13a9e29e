"""The fused output layer + cross-entropy against the plain path: same loss, same gradients, and
never the whole [tokens, vocab] logits at once."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from llmscale.bench.measured_memory import AllocationTrace
from llmscale.models.fused_loss import IGNORE_INDEX, LinearCrossEntropy
from model_twins import assert_same_step, relative_error, shifted_batch, twin_models
from test_llama import TINY


def _inputs(tokens=50, hidden=32, vocab=96):
    generator = torch.Generator().manual_seed(0)
    hidden_states = torch.randn(tokens, hidden, generator=generator, requires_grad=True)
    weight = torch.randn(vocab, hidden, generator=generator, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    labels[::7] = IGNORE_INDEX
    return hidden_states, weight, labels


@pytest.mark.parametrize("chunk_tokens", [7, 16, 1000])  # a ragged last chunk, and one chunk
def test_loss_and_gradients_equal_the_plain_path(chunk_tokens):
    hidden, weight, labels = _inputs()
    plain = F.cross_entropy(hidden @ weight.t(), labels, reduction="sum",
                            ignore_index=IGNORE_INDEX) / 3.0
    plain_grads = torch.autograd.grad(plain, (hidden, weight))

    fused_loss = LinearCrossEntropy(vocab_size=weight.shape[0])
    fused_loss.chunk_tokens = chunk_tokens
    fused = fused_loss(hidden, weight, labels) / 3.0
    fused_grads = torch.autograd.grad(fused, (hidden, weight))

    assert fused.item() == pytest.approx(plain.item(), rel=1e-6)
    for ours, reference in zip(fused_grads, plain_grads):
        assert relative_error(ours, reference) < 1e-6
    # Ignored tokens get no gradient at all.
    assert torch.all(fused_grads[0][labels == IGNORE_INDEX] == 0)


@pytest.mark.parametrize("tied", [False, True])
def test_model_trains_the_same_with_the_fused_loss(tied):
    cfg = replace(TINY, tie_embeddings=tied)
    plain, fused = twin_models(cfg)
    fused.use_fused_loss()
    fused.fused_loss.chunk_tokens = 10  # several chunks of the 2 x 16 tokens
    assert_same_step(plain, fused, *shifted_batch(cfg), tolerance=1e-6)


def test_bf16_autocast_matches_the_plain_path_to_bf16_precision():
    hidden, weight, labels = _inputs(tokens=64, hidden=64, vocab=128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = F.cross_entropy((hidden @ weight.t()).float(), labels, reduction="sum",
                                ignore_index=IGNORE_INDEX)
        fused = LinearCrossEntropy(vocab_size=128)(hidden, weight, labels)
    plain_grads = torch.autograd.grad(plain, (hidden, weight))
    fused_grads = torch.autograd.grad(fused, (hidden, weight))
    assert fused.dtype == torch.float32
    assert fused.item() == pytest.approx(plain.item(), rel=1e-2)
    for ours, reference in zip(fused_grads, plain_grads):
        assert ours.dtype == reference.dtype == torch.float32
        assert relative_error(ours, reference) < 2e-2


def test_never_holds_the_whole_logits():
    tokens, vocab = 4096, 2048
    hidden, weight, labels = _inputs(tokens=tokens, hidden=16, vocab=vocab)
    full_logits_fp32 = tokens * vocab * 4
    fused_loss = LinearCrossEntropy(vocab_size=vocab)
    fused_loss.chunk_tokens = 256
    with AllocationTrace() as trace:
        fused_loss(hidden, weight, labels).backward()
    # A chunk's logits and softmax (a few times 2 MiB), far below the 32 MiB of the whole.
    assert trace.peak() < full_logits_fp32 / 4

    with AllocationTrace() as trace:
        F.cross_entropy(hidden @ weight.t(), labels, ignore_index=IGNORE_INDEX).backward()
    assert trace.peak() > full_logits_fp32  # the measurement sees what the plain path holds


def test_chunks_are_sized_by_the_vocabulary():
    assert LinearCrossEntropy(vocab_size=32000).chunk_tokens == 2**30 // (4 * 32000)
    assert LinearCrossEntropy(vocab_size=128256).chunk_tokens == 2**30 // (4 * 128256)
