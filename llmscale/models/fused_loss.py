"""The output layer and cross-entropy fused over chunks of tokens.

The plain path materialises logits [tokens, vocab] and, for the loss, an fp32 copy of them:
at micro-batch 8 x 2048 tokens and a 128k vocabulary that copy alone is 8.4 GB, held until the
backward pass. Here each chunk of tokens goes through the output layer, the loss and the
gradients of the loss in the forward pass (as Liger's fused linear cross-entropy does), so only
one chunk's logits exist at a time, and the backward pass only scales the gradients already
computed. The matmuls are the plain path's three (logits, gradient of the input, gradient of the
weight); the fp32 softmax is computed once instead of twice.
"""

from typing import Callable, Tuple

import torch

IGNORE_INDEX = -100
# A chunk's fp32 logits are at most this many bytes: 1 GiB (8k tokens at a 32k vocabulary).
_CHUNK_LOGIT_BYTES = 2**30

ChunkFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                   Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def chunk_loss_and_grads(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    """For hidden [C, H], weight [V, H], labels [C]: the summed cross-entropy (fp32) and its
    gradients with respect to hidden and weight (fp32)."""
    logits = (hidden @ weight.t()).float()
    log_normalizer = logits.logsumexp(dim=-1, keepdim=True)
    targets = labels != IGNORE_INDEX
    target_ids = labels.masked_fill(~targets, 0).unsqueeze(-1)
    token_losses = (log_normalizer - logits.gather(-1, target_ids)).squeeze(-1)
    loss = token_losses.masked_fill(~targets, 0.0).sum()
    # d loss / d logits = softmax - one_hot(target), zero for ignored tokens.
    grad_logits = (logits - log_normalizer).exp()
    grad_logits.scatter_add_(-1, target_ids, torch.full_like(target_ids, -1.0, dtype=torch.float))
    grad_logits = grad_logits.masked_fill_(~targets.unsqueeze(-1), 0.0).to(hidden.dtype)
    return loss, (grad_logits @ weight).float(), (grad_logits.t() @ hidden).float()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens: int, chunk_fn: ChunkFn):
        compute_dtype = (torch.get_autocast_dtype(hidden.device.type)
                         if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype)
        hidden_c, weight_c = hidden.to(compute_dtype), weight.to(compute_dtype)
        loss = torch.zeros((), dtype=torch.float, device=hidden.device)
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float, device=weight.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_tokens):
                rows = slice(start, start + chunk_tokens)
                chunk_loss, grad_hidden[rows], chunk_grad_weight = chunk_fn(
                    hidden_c[rows], weight_c, labels[rows])
                loss += chunk_loss
                grad_weight += chunk_grad_weight
        ctx.save_for_backward(grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None


class LinearCrossEntropy:
    """Summed token cross-entropy of `hidden @ weight.T` against `labels` (-100 ignored)."""

    def __init__(self, vocab_size: int) -> None:
        self.chunk_tokens = max(1, _CHUNK_LOGIT_BYTES // (4 * vocab_size))
        self.chunk_fn: ChunkFn = chunk_loss_and_grads

    def compile(self) -> None:
        """Compiles the per-chunk work (one graph, reused by every chunk of the same size)."""
        self.chunk_fn = torch.compile(chunk_loss_and_grads)

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:
        """hidden [..., H], labels [...] of the same leading shape; a scalar fp32 sum."""
        return _LinearCrossEntropy.apply(hidden.flatten(0, -2), weight, labels.flatten(),
                                         self.chunk_tokens, self.chunk_fn)
