"""Preference optimisation's figures averaged over every pair of a global batch, whichever rank
and micro-batch holds it: the held-out loss and TRL's reward and log-prob metrics at validation,
and (`global_pair_means`) the same metrics of each training step."""

from functools import partial
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from llmscale.config.schema import DPOConfig
from llmscale.objectives.preference import PreferenceLoss
from llmscale.objectives.preference_batch import micro_batch_preference
from llmscale.parallel.token_mean import all_reduce_data_parallel

# A micro-batch of pairs: input ids and labels [B, 2, S], reference log-probs [B, 2] (or None).
PairBatch = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]


def global_pair_means(results: List[PreferenceLoss], device: torch.device) -> Dict[str, float]:
    """`loss` and TRL's metrics, each summed over this rank's `results` and every data-parallel
    rank's, over the number of pairs summed alike (one all-reduce)."""
    names = ["loss", *results[0].sums()]
    totals = torch.stack([
        torch.stack([result.losses.detach().sum(), *result.sums().values(),
                     result.losses.new_tensor(len(result.losses))]).double().to(device)
        for result in results]).sum(dim=0)
    totals = all_reduce_data_parallel(totals)
    return {name: (total / totals[-1]).item() for name, total in zip(names, totals)}


@torch.no_grad()
def evaluate_preferences(engine, batches: List[PairBatch], device: torch.device,
                         cfg: DPOConfig, adapter_model: Optional[nn.Module] = None
                         ) -> Dict[str, float]:
    """`val_loss` and `val_rewards/...`, `val_logps/...` over every held-out pair
    (`adapter_model`: the reference is its base, computed on the fly)."""
    engine.eval()
    forward = partial(engine, per_token=True)
    results = [micro_batch_preference(forward, cfg, inputs.to(device), labels.to(device),
                                      None if reference is None else reference.to(device),
                                      adapter_model)
               for inputs, labels, reference in batches]
    engine.train()
    return {f"val_{name}": value for name, value in global_pair_means(results, device).items()}
