"""Peak accelerator memory, a per-step metric beside tokens/s."""

from typing import Dict

import torch
import torch.distributed as dist


def peak_memory_metrics(device: torch.device) -> Dict[str, float]:
    """`peak_memory_gib`: the largest `torch.cuda.max_memory_allocated` of any rank so far.

    Every rank must call it (one all-reduce): ranks need not be alike, as pipeline stages are not.
    Nothing on CPU, where rank memory is the process's RSS, which a benchmark reads from outside
    (llmscale.bench.plans)."""
    if device.type != "cuda":
        return {}
    peak = torch.tensor(float(torch.cuda.max_memory_allocated(device)), device=device)
    if dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return {"peak_memory_gib": peak.item() / 2**30}
