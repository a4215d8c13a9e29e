"""A bare PyTorch training loop on llmscale's model, data, AdamW and LR schedule: the yardstick
that the DeepSpeed trainer is measured against (tools/bench.py, tools/bench_overhead.py).

    python -m llmscale.bench.bare_loop +exp=tiny key=value ...

One process, one device. It sets up as `pretrain` does (seeding, sample order, AdamW param
groups, LR schedule, clipping, the plan's compiled layers, fused loss and fused AdamW; bf16
autocast when train.precision=bf16), times each step as the
trainer does (batch collation outside the timer, the copy to the device inside) and writes the
trainer's per-step metrics to <train.run_dir>/metrics.jsonl, so that a benchmark reads both runs
alike. No evaluation, no checkpoints.
"""

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from llmscale.config.load import REPO_ROOT, ConfigError, load_config, strip_launcher_args
from llmscale.config.plan import ParallelPlan
from llmscale.config.schema import LLMScaleConfig, Precision
from llmscale.config.validate import validate
from llmscale.data import GlobalSampleOrder, rank_micro_batches
from llmscale.data.build import build_datasets, resolve_vocab_size
from llmscale.models import Llama, flops_per_token
from llmscale.optim.lr_schedule import build_lr_scheduler
from llmscale.optim.optimizer import build_optimizer
from llmscale.parallel.distributed import end_distributed, init_distributed, read_world_size
from llmscale.parallel.parallelize import parallelize
from llmscale.tracking.sinks import JsonlSink
from llmscale.train.peak_memory import peak_memory_metrics
from llmscale.train.throughput import ThroughputMeter, peak_tflops
from llmscale.train.trainer import seed_everything

Batch = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class TrainingBatches:
    """The micro-batches that `pretrain` feeds one rank, step by step."""

    train_set: Dataset
    order: GlobalSampleOrder
    plan: ParallelPlan
    rank: int

    def for_step(self, step: int) -> List[Batch]:
        """`step` counts optimizer steps from 0."""
        return rank_micro_batches(
            self.train_set, self.order, step * self.plan.global_batch_size,
            self.plan.micro_batch_size, self.plan.grad_accum_steps, self.rank, self.plan.dp,
        )


def load_training_batches(cfg: LLMScaleConfig, plan: ParallelPlan, rank: int) -> TrainingBatches:
    """Also sets `cfg.model.vocab_size` from the tokenizer, as `pretrain` does."""
    train_set, _, tokenizer = build_datasets(cfg, REPO_ROOT)
    cfg.model.vocab_size = resolve_vocab_size(cfg.model, tokenizer.vocab_size)
    return TrainingBatches(train_set, GlobalSampleOrder(len(train_set), cfg.data.seed), plan, rank)


class BareLoop:
    """model(inputs, labels); (loss / accum).backward() per micro-batch; clip_grad_norm_;
    optimizer.step(); zero_grad(); scheduler.step(); loss.item()."""

    def __init__(self, model: torch.nn.Module, cfg: LLMScaleConfig, plan: ParallelPlan,
                 device: torch.device):
        self.model = model.to(device).train()
        self.device = device
        self.optimizer = build_optimizer(self.model, cfg, plan)
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.optim, cfg.train.max_steps)
        self.clip_grad = cfg.optim.clip_grad
        self.bf16 = cfg.train.precision == Precision.bf16

    def step(self, batches: List[Batch]) -> float:
        """One optimizer step; returns the mean loss of its micro-batches."""
        losses = []
        for inputs, labels in batches:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss = self.model(inputs.to(self.device), labels.to(self.device))
            (loss / len(batches)).backward()
            losses.append(loss.detach())
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return torch.stack(losses).mean().item()


def train_bare(cfg: LLMScaleConfig) -> Path:
    """Runs `train.max_steps` steps; returns the metrics file."""
    if read_world_size() != 1:
        raise ConfigError(
            f"the bare loop runs in one process, not WORLD_SIZE={read_world_size()}: launch it "
            "with `python -m llmscale.bench.bare_loop` or `torchrun --nproc_per_node 1`"
        )
    plan = validate(cfg, 1)
    process = init_distributed()  # the trainer's device choice and CPU thread count
    batches = load_training_batches(cfg, plan, process.rank)
    seed_everything(cfg.train.seed)
    loop = BareLoop(parallelize(Llama(cfg.model), plan), cfg, plan, process.device)
    tokens_per_step = plan.global_batch_size * cfg.data.seq_len
    meter = ThroughputMeter(flops_per_token(cfg.model, cfg.data.seq_len), 1,
                            peak_tflops(process.device))
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    sink = JsonlSink(run_dir / "metrics.jsonl")
    for step in range(cfg.train.max_steps):
        step_batches = batches.for_step(step)
        start = time.perf_counter()
        loss = loop.step(step_batches)
        seconds = time.perf_counter() - start
        sink.log(step + 1, {"loss": loss, **meter.measure(tokens_per_step, seconds),
                            **peak_memory_metrics(process.device)})
    sink.close()
    return run_dir / "metrics.jsonl"


def main(argv: Sequence[str]) -> None:
    metrics = train_bare(load_config(strip_launcher_args(argv)))
    end_distributed()
    print(f"bare loop: metrics in {metrics.resolve()}")


if __name__ == "__main__":
    main(sys.argv[1:])
