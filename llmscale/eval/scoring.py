"""Log-likelihoods of continuations: the log-probability the model gives each continuation token,
after the context and the continuation tokens before it."""

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from llmscale.models import Llama

Request = Tuple[List[int], List[int]]  # (context ids, continuation ids)


@torch.no_grad()
def continuation_logprobs(model: Llama, requests: Sequence[Request]) -> List[torch.Tensor]:
    """Per-token log-probabilities (fp32, on the CPU) of each request's continuation, all requests
    in one right-padded batch (causal attention: the padding after a row never reaches it). A
    context longer than the model's window loses its oldest tokens."""
    window = model.cfg.max_seq_len
    rows = []
    for context, continuation in requests:
        if not context or not continuation:
            raise ValueError("a scored request needs at least one context and one continuation "
                             "token")
        if len(continuation) > window:
            raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the "
                             f"model's window of {window} (model.max_seq_len)")
        rows.append((context + continuation)[-(window + 1):])
    inputs = torch.zeros(len(rows), max(map(len, rows)) - 1, dtype=torch.long)
    for row, ids in zip(inputs, rows):
        row[: len(ids) - 1] = torch.tensor(ids[:-1])
    device = next(model.parameters()).device
    logprobs = F.log_softmax(model(inputs.to(device)).float(), dim=-1)
    scores = []
    for index, (ids, (_, continuation)) in enumerate(zip(rows, requests)):
        end = len(ids) - 1
        positions = torch.arange(end - len(continuation), end, device=device)
        targets = torch.tensor(continuation, device=device)
        scores.append(logprobs[index, positions, targets].cpu())
    return scores
