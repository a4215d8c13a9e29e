"""Preference optimisation's figures averaged over every pair of a global batch, whichever rank
and micro-batch holds it: the held-out loss and TRL's reward and log-prob metrics at validation,
and (`global_pair_means`) the same metrics of each training step."""

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from llmscale.config.schema import DPOConfig
from llmscale.objectives.preference_batch import PairBatch, PairLogps, pair_preference
from llmscale.parallel.pair_forward import forward_pairs, with_base_reference
from llmscale.parallel.token_mean import all_reduce_data_parallel


def global_pair_means(cfg: DPOConfig, logps: Sequence[PairLogps], batches: Sequence[PairBatch],
                      device: torch.device) -> Dict[str, float]:
    """`loss` and TRL's metrics of the pairs of `batches` with log-probs `logps`, each summed
    over this rank's micro-batches and every data-parallel rank's, over the number of pairs
    summed alike (one all-reduce)."""
    results = [pair_preference(cfg, pair, None if reference is None else reference.to(device))
               for pair, (_, _, reference) in zip(logps, batches)]
    names = ["loss", *results[0].sums()]
    totals = torch.stack([
        torch.stack([result.losses.detach().sum(), *result.sums().values(),
                     result.losses.new_tensor(len(result.losses))]).double().to(device)
        for result in results]).sum(dim=0)
    totals = all_reduce_data_parallel(totals)
    return {name: (total / totals[-1]).item() for name, total in zip(names, totals)}


def evaluate_preferences(engine, batches: List[PairBatch], device: torch.device,
                         cfg: DPOConfig, adapter_model: Optional[nn.Module] = None
                         ) -> Dict[str, float]:
    """`val_loss` and `val_rewards/...`, `val_logps/...` over every held-out pair
    (`adapter_model`: the reference is its base, computed on the fly)."""
    if adapter_model is not None:
        batches = with_base_reference(engine, adapter_model, batches, device)
    logps = forward_pairs(engine, batches, device)
    return {f"val_{name}": value
            for name, value in global_pair_means(cfg, logps, batches, device).items()}
