"""The reference model's log-probs of every preference pair for fine-tuning all weights, computed
once and cached beside the data, so that DPO needs no second model resident. (An adapter run
needs no cache: its reference is its frozen base, a forward with the adapters off,
`llmscale.parallel.pair_forward.with_base_reference`.)

DPO compares the policy's response log-probs with those of the model it started from. Before
its first step a fresh run computes them in one pass over every pair (training and held out)
with its initial weights, and caches them as `<data.pairs>/reference_logps-<key>.pt`: a
[pairs, 2] fp32 table, chosen and rejected, indexed as the folder's pairs.

The key hashes what the log-probs depend on: where the initial weights come from (the files of
train.init_from, by name, size and modification time, or the seed that draws them), the pairs'
files alike, the model settings, precision, data.seq_len (responses cut at the window) and
data.document_attention. It leaves out the layout:
a run on other ranks or micro-batches reuses the cache (and so compares against exactly the same
numbers); computed again, they could differ in the last bits.

A fresh run reuses a cache with its key and computes a missing one. A resumed run has only
trained weights, which are no reference: it refuses when its cache is gone rather than compute a
different one, so a resume continues the uninterrupted run bit for bit.
"""

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

from llmscale.checkpoint.frozen_base import initial_weights_dir
from llmscale.config.load import ConfigError
from llmscale.config.plan import ParallelPlan
from llmscale.config.schema import LLMScaleConfig
from llmscale.data.chat_samples import prepared_folder
from llmscale.data.preference_pairs import PreferencePairs
from llmscale.parallel.pair_forward import forward_pairs
from llmscale.parallel.token_mean import all_reduce_data_parallel


def reference_cache_path(cfg: LLMScaleConfig, root: Path) -> Path:
    folder = prepared_folder(cfg.data.pairs, root)
    return folder / f"reference_logps-{reference_key(cfg, folder)}.pt"


def reference_key(cfg: LLMScaleConfig, folder: Path) -> str:
    weights = initial_weights_dir(cfg.train.init_from)
    identity = {
        "initial_weights": _files_identity(weights) if weights else {"seed": cfg.train.seed},
        "pairs": _files_identity(folder, exclude="reference_logps-"),
        "model": dataclasses.asdict(cfg.model),
        "precision": cfg.train.precision,
        "seq_len": cfg.data.seq_len,
        "document_attention": cfg.data.document_attention,
    }
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _files_identity(folder: Path, exclude: Optional[str] = None) -> List[list]:
    return [[str(path.relative_to(folder)), path.stat().st_size, path.stat().st_mtime_ns]
            for path in sorted(folder.rglob("*"))
            if path.is_file() and not (exclude and path.name.startswith(exclude))]


def reference_logps(engine, cfg: LLMScaleConfig, root: Path, splits: Sequence[PreferencePairs],
                    plan: ParallelPlan, dp_rank: int, device: torch.device, resumed: bool,
                    is_main: bool, report: Callable[[str], None]) -> torch.Tensor:
    """The [pairs, 2] table of the pairs folder: loaded from its cache, or, for a fresh run,
    computed with the engine's (initial) weights over `splits` and cached."""
    path = reference_cache_path(cfg, root)
    if path.is_file():
        report(f"reference log-probs from {path}")
        return torch.load(path, map_location="cpu", weights_only=True)
    if resumed:
        raise ConfigError(
            f"this DPO run's reference log-probs are gone (no {path}): a resumed run holds "
            "trained weights, not the initial ones, and cannot compute them again. Restore the "
            "file, or start afresh (train.resume=none, or a new train.run_dir)")
    start = time.perf_counter()
    table = compute_reference_logps(engine, splits, plan, dp_rank, device).cpu()
    if is_main:
        partial_path = path.with_name(path.name + ".partial")
        torch.save(table, partial_path)
        os.replace(partial_path, path)  # whole or absent, for a run that reads it later
    report(f"reference log-probs of {len(table)} pairs computed in "
           f"{time.perf_counter() - start:.1f}s, cached at {path}")
    return table


def compute_reference_logps(engine, splits: Sequence[PreferencePairs], plan: ParallelPlan,
                            dp_rank: int, device: torch.device) -> torch.Tensor:
    """Each data-parallel rank runs its share of micro-batches over every split, all ranks the
    same number (ZeRO-3 gathers weights in step; a pipeline's stages run them together): a rank
    short of pairs at the end runs a split's first pair again and drops its result. Each pair is
    written by one rank, so the all-reduced sum is the table (on every pipeline stage)."""
    count = sum(len(split) for split in splits)
    table = torch.zeros(count, 2, dtype=torch.float32, device=device)
    per_round = plan.micro_batch_size * plan.dp
    batches, places = [], []
    for split in splits:
        for first in range(0, len(split), per_round):
            mine = [first + dp_rank * plan.micro_batch_size + j
                    for j in range(plan.micro_batch_size)]
            kept = torch.tensor([index < len(split) for index in mine])
            samples = [split[index if index < len(split) else first] for index in mine]
            inputs, labels, pairs = (torch.stack(part) for part in zip(*samples))
            batches.append((inputs, labels, None))
            places.append((pairs[kept].to(device), kept.to(device)))
    for (logps, _), (pairs, kept) in zip(forward_pairs(engine, batches, device), places):
        table[pairs] = logps[kept].float()
    return all_reduce_data_parallel(table)
