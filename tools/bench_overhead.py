"""llmscale's training step beside a bare PyTorch loop on the same model, data and AdamW, in one
process on one device: the single-GPU benchmark, and the overhead check on a CPU.

    python tools/bench_overhead.py +exp=tiny [key=value ...] [--micro-batch-sizes 8 16]
        [--steps 30] [--warmup 5] [--no-pretrain-check] [--output DIR]

For each micro-batch size (global batch = micro-batch, no accumulation), both sides start from
the same initial weights (seeded as `pretrain` seeds them), with the same plan applied
(`parallelize`: compiled layers and the fused loss where the plan has them), on the same
micro-batches, with the same AdamW (`build_optimizer`, fused where the plan says), LR schedule
and clipping:

- llmscale: the DeepSpeed engine from `build_engine`, driven by `train_step`, the step
  `pretrain`'s loop runs (llmscale/train/step.py), plus its get_lr and get_global_grad_norm.
- bare: `BareLoop` (llmscale/bench/bare_loop.py): bf16 autocast over fp32 weights where the
  config says train.precision=bf16.

Steps alternate (llmscale, bare, llmscale, ...) so drift hits both alike; batch collation is
outside both timers and the copy to the device inside, as in the trainer's own tokens/s. The
losses of the two loops are compared to show they do the same work; the headline ratio is the
median of the per-step time ratios.

Then (unless --no-pretrain-check) the real `pretrain` runs the same steps alone in the process
(console hidden; JSONL on; evaluation and checkpoints off or at the end): its own timer's
tokens/s and its peak device memory are the trainer's figures, undisturbed by the bare loop.

FLOPs per token are 6 N + 12 L H S (N: matmul weights, lm_head included; no halving for causal
attention: PaLM's and torchtitan's convention). MFU is against the device's dense bf16 peak.
On CUDA the memory figures are what the two loops' weights and optimizer states hold together
(resident) and what each loop's step adds at its peak (activations, gradients, temporaries).
Printed, and with --output written to DIR as overhead.csv and overhead.json (and with --profile,
a torch.profiler table of 3 more steps of each loop per micro-batch size).
"""

import argparse
import contextlib
import copy
import csv
import gc
import importlib.util
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

if importlib.util.find_spec("llmscale") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmscale.bench.bare_loop import BareLoop, load_training_batches  # noqa: E402
from llmscale.bench.plans import step_figures  # noqa: E402
from llmscale.config.load import load_config  # noqa: E402
from llmscale.config.schema import LLMScaleConfig  # noqa: E402
from llmscale.config.validate import validate  # noqa: E402
from llmscale.models import Llama, flops_per_token  # noqa: E402
from llmscale.models.flops import count_parameters  # noqa: E402
from llmscale.parallel.distributed import DistributedContext, init_distributed  # noqa: E402
from llmscale.parallel.engine import build_engine  # noqa: E402
from llmscale.parallel.parallelize import parallelize  # noqa: E402
from llmscale.train.step import train_step  # noqa: E402
from llmscale.train.throughput import ThroughputMeter, peak_tflops  # noqa: E402
from llmscale.train.trainer import pretrain, seed_everything  # noqa: E402

COLUMNS = ["model", "seq_len", "micro_batch_size", "tokens_per_s", "bare_tokens_per_s", "vs_bare",
           "tflops", "bare_tflops", "mfu", "bare_mfu", "pretrain_tokens_per_s", "pretrain_mfu",
           "pretrain_peak_memory_gib", "step_memory_gib", "bare_step_memory_gib",
           "resident_memory_gib", "max_loss_diff", "plan"]


def llmscale_step(engine, batches, device: torch.device) -> float:
    """The body of `pretrain`'s loop, minus the metric sinks."""
    engine.get_lr()
    loss, _ = train_step(engine, batches, device, check_loss=lambda loss: None)
    float(engine.get_global_grad_norm() or 0.0)
    return loss


class StepTimer:
    """Seconds and, on CUDA, the memory a step adds above what was allocated when it began."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds: List[float] = []
        self.step_memory_gib = 0.0

    def run(self, fn, *args, keep: bool):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            resident = torch.cuda.memory_allocated()
        start = time.perf_counter()
        loss = fn(*args)  # ends in .item(): the device has finished
        seconds = time.perf_counter() - start
        if keep:
            self.seconds.append(seconds)
            if self.cuda:
                added = (torch.cuda.max_memory_allocated() - resident) / 2**30
                self.step_memory_gib = max(self.step_memory_gib, added)
        return loss


def profile_steps(runs: Dict, path: Path, steps: int = 3) -> None:
    """`steps` more steps of each loop under torch.profiler: the operators and kernels that took
    the most time, a table per loop, written to `path`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    sort_by = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    tables = []
    for name, (fn, *args) in runs.items():
        with profile(activities=activities) as profiler:
            for _ in range(steps):
                fn(*args)
        for key in dict.fromkeys([sort_by, "self_cpu_time_total"]):
            tables.append(f"== {name}: {steps} steps, top operators by {key}\n"
                          + profiler.key_averages().table(sort_by=key, row_limit=30,
                                                          max_name_column_width=70))
    path.write_text("\n\n".join(tables) + "\n")


def compare(cfg: LLMScaleConfig, process: DistributedContext, warmup: int, steps: int,
            profile_to: Optional[Path] = None) -> Dict:
    """The two loops, interleaved; their figures. With `profile_to`, a profile of each after."""
    plan = validate(cfg, process.world_size)
    data = load_training_batches(cfg, plan, process.rank)
    seed_everything(cfg.train.seed)
    model = Llama(cfg.model)
    bare = BareLoop(parallelize(copy.deepcopy(model), plan), cfg, plan, process.device)
    engine = build_engine(parallelize(model, plan), cfg, plan)
    timers = {"llmscale": StepTimer(process.device), "bare": StepTimer(process.device)}
    losses: Dict[str, List[float]] = {"llmscale": [], "bare": []}
    for step in range(warmup + steps):
        batches = data.for_step(step)
        runs = {"llmscale": (llmscale_step, engine, batches, process.device),
                "bare": (bare.step, batches)}
        for name in (["llmscale", "bare"] if step % 2 else ["bare", "llmscale"]):
            losses[name].append(timers[name].run(*runs[name], keep=step >= warmup))
    resident = torch.cuda.memory_allocated() / 2**30 if process.device.type == "cuda" else None
    if profile_to:
        batches = data.for_step(warmup + steps)
        profile_steps({"llmscale": (llmscale_step, engine, batches, process.device),
                       "bare": (bare.step, batches)}, profile_to)
    ratios = [a / b for a, b in zip(timers["llmscale"].seconds, timers["bare"].seconds)]
    diffs = [abs(a - b) for a, b in zip(losses["llmscale"], losses["bare"])]
    return {"plan": plan.describe(), "timers": timers, "losses": losses,
            "resident_memory_gib": resident,
            "vs_bare": 1 / statistics.median(ratios), "max_loss_diff": max(diffs)}


def run_pretrain(cfg: LLMScaleConfig, warmup: int) -> Dict[str, Optional[float]]:
    """The real trainer's own figures over the same steps, medians after `warmup`."""
    cfg = copy.deepcopy(cfg)
    with tempfile.TemporaryDirectory() as run_dir:
        cfg.train.run_dir, cfg.train.resume, cfg.name = run_dir, "none", "bench_overhead"
        cfg.train.eval_interval = cfg.train.log_interval = cfg.train.max_steps
        cfg.train.eval_batches = 1
        cfg.checkpoint.interval, cfg.checkpoint.save_final = 0, False
        cfg.logging.jsonl, cfg.logging.tensorboard, cfg.logging.wandb = True, False, False
        cfg.logging.progress_bar = False
        with contextlib.redirect_stdout(io.StringIO()):
            pretrain(cfg)
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if "tokens_per_s" in r][warmup:]

    figures = step_figures(records)
    return {"pretrain_tokens_per_s": figures["tokens_per_s"], "pretrain_mfu": figures["mfu"],
            "pretrain_peak_memory_gib": figures["peak_memory_gib"],
            "pretrain_losses": [r["loss"] for r in records]}


def measure(base: LLMScaleConfig, process: DistributedContext, micro_batch_size: Optional[int],
            warmup: int, steps: int, pretrain_check: bool,
            profile_to: Optional[Path] = None) -> Dict:
    cfg = copy.deepcopy(base)
    if micro_batch_size:
        cfg.train.micro_batch_size = micro_batch_size
    cfg.train.global_batch_size, cfg.train.grad_accum_steps = cfg.train.micro_batch_size, None
    cfg.train.max_steps, cfg.train.exit_at_step = warmup + steps, None  # both loops' LR schedule
    result = compare(cfg, process, warmup, steps, profile_to)
    timers = result.pop("timers")
    tokens_per_step = cfg.train.micro_batch_size * cfg.data.seq_len
    meter = ThroughputMeter(flops_per_token(cfg.model, cfg.data.seq_len), 1,
                            peak_tflops(process.device))
    ours = meter.measure(tokens_per_step, statistics.median(timers["llmscale"].seconds))
    bare = meter.measure(tokens_per_step, statistics.median(timers["bare"].seconds))
    row = {"model": cfg.model.name, "seq_len": cfg.data.seq_len,
           "micro_batch_size": cfg.train.micro_batch_size,
           "parameters": count_parameters(cfg.model),
           "tokens_per_s": ours["tokens_per_s"], "bare_tokens_per_s": bare["tokens_per_s"],
           "tflops": ours["tflops_per_device"], "bare_tflops": bare["tflops_per_device"],
           "mfu": ours.get("mfu"), "bare_mfu": bare.get("mfu"),
           "step_memory_gib": timers["llmscale"].step_memory_gib or None,
           "bare_step_memory_gib": timers["bare"].step_memory_gib or None, **result}
    _release_device_memory()
    if pretrain_check:
        row.update(run_pretrain(cfg, warmup))
        _release_device_memory()
    return row


def _release_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _cell(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_row(row: Dict) -> None:
    losses = row["losses"]
    print(f"{row['model']} seq {row['seq_len']} micro-batch {row['micro_batch_size']} "
          f"({row['parameters']:,} parameters; {row['plan']})\n"
          f"  loss step 1 .. {len(losses['llmscale'])}: {losses['llmscale'][0]:.4f} .. "
          f"{losses['llmscale'][-1]:.4f}; max |llmscale - bare| {row['max_loss_diff']:.2e}\n"
          f"  llmscale {row['tokens_per_s']:12,.0f} tokens/s {row['tflops']:8.2f} TFLOP/s "
          f"MFU {_cell(row['mfu'], '.1%')}\n"
          f"  bare     {row['bare_tokens_per_s']:12,.0f} tokens/s {row['bare_tflops']:8.2f} "
          f"TFLOP/s MFU {_cell(row['bare_mfu'], '.1%')}\n"
          f"  llmscale / bare tokens/s: {row['vs_bare']:.3f} (median of per-step ratios)")
    if row["resident_memory_gib"] is not None:
        print(f"  memory: {row['resident_memory_gib']:.1f} GiB resident (both loops' weights and "
              f"optimizer states); a step adds {row['step_memory_gib']:.1f} GiB (llmscale), "
              f"{row['bare_step_memory_gib']:.1f} GiB (bare)")
    if "pretrain_tokens_per_s" in row:
        print(f"  pretrain() alone: {_cell(row['pretrain_tokens_per_s'], ',.0f')} tokens/s, "
              f"MFU {_cell(row['pretrain_mfu'], '.1%')}, peak memory "
              f"{_cell(row['pretrain_peak_memory_gib'], '.2f')} GiB")


def write_outputs(rows: List[Dict], context: Dict, output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / "overhead.json").write_text(json.dumps({**context, "rows": rows}, indent=2) + "\n")
    with (output / "overhead.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(COLUMNS)
        writer.writerows([[row.get(column) for column in COLUMNS] for row in rows])


def main(argv) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batch-sizes", nargs="+", type=int, default=[None], metavar="N",
                        help="default: the config's train.micro_batch_size")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--no-pretrain-check", dest="pretrain_check", action="store_false",
                        help="skip the run of the real trainer after the loops")
    parser.add_argument("--output", type=Path, help="folder for overhead.csv and overhead.json")
    parser.add_argument("--profile", action="store_true",
                        help="then profile 3 steps of each loop: DIR/profile_micro<N>.txt")
    args, overrides = parser.parse_known_args(argv)
    base = load_config(overrides)
    process = init_distributed()  # sets the CPU thread count both loops then share
    device_name = (torch.cuda.get_device_name(process.device) if process.device.type == "cuda"
                   else f"CPU, {torch.get_num_threads()} threads")
    print(f"device: {device_name}; torch {torch.__version__}; {args.warmup} warm-up + "
          f"{args.steps} timed steps per loop")
    rows = []
    for micro in args.micro_batch_sizes:
        profile_to = (args.output / f"profile_micro{micro or base.train.micro_batch_size}.txt"
                      if args.profile and args.output else None)
        if profile_to:
            args.output.mkdir(parents=True, exist_ok=True)
        rows.append(measure(base, process, micro, args.warmup, args.steps, args.pretrain_check,
                            profile_to))
        print_row(rows[-1])
    if args.output:
        write_outputs(rows, {"command": " ".join(["tools/bench_overhead.py", *argv]),
                             "device": device_name, "torch": torch.__version__,
                             "steps": args.steps, "warmup": args.warmup}, args.output)


if __name__ == "__main__":
    main(sys.argv[1:])
