"""Throughput and memory of parallel plans, each a real training run started by torchrun, beside a
bare PyTorch loop on the same model and data.

    python tools/bench.py +exp=tiny [key=value ...] --plans zero0 dp2-zero1 "dp2-zero3 KEY=VALUE"
        [--micro-batch-sizes 4 8] [--steps 20] [--warmup 5] [--nproc-per-node N] [--output DIR]

Hydra overrides for every run come first. A plan is one argument: short specs joined by '-'
(dpN, tpN, ppN, zeroN) and/or Hydra overrides; one without dpN runs on --nproc-per-node ranks.
Each plan x micro-batch size takes warmup + steps steps in a temporary folder, without
checkpoints; the bare loop (llmscale/bench/bare_loop.py) runs once per workload, on one device.
Printed, and written to DIR as bench.csv, bench.json and bench.png: median tokens/s (all ranks, and
per device), TFLOP/s per device, MFU (where the device's peak is known), peak memory per rank and
each plan's tokens/s per device relative to the bare loop's on one device. A device is a rank; on
CPU the ranks share the cores. Model, data and precision are the config's (train.precision=bf16
for bf16).
"""

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

from llmscale.bench.plans import benchmark, plan_runs
from llmscale.bench.report import (
    format_table,
    plot_tokens_per_s,
    write_csv,
    write_json,
)
from llmscale.config.load import ConfigError


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plans", nargs="+", required=True, metavar="PLAN",
                        help="e.g. zero1 dp2-zero3 'parallel.zero_stage=2 parallel.dp=2'")
    parser.add_argument("--micro-batch-sizes", nargs="+", type=int, default=[None], metavar="N",
                        help="default: the config's train.micro_batch_size")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=5,
                        help="steps each run takes first, left out of the figures")
    parser.add_argument("--nproc-per-node", type=int, default=torch.cuda.device_count() or 1,
                        help="ranks of a plan that names no dpN (default: the GPUs, or 1)")
    parser.add_argument("--output", type=Path,
                        default=Path("runs/bench") / time.strftime("%Y%m%d-%H%M%S"),
                        help="folder for bench.csv, bench.json, bench.png "
                             "(default: runs/bench/DATE-TIME)")
    args, overrides = parser.parse_known_args(argv)
    unknown = [arg for arg in overrides if arg.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    try:
        pairs = plan_runs(overrides, args.plans, args.micro_batch_sizes,
                          args.warmup + args.steps, args.nproc_per_node)
    except ConfigError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 2

    load_before = os.getloadavg()
    rows = benchmark(pairs, args.warmup, lambda line: print(f"bench: {line}", flush=True))
    load_after = os.getloadavg()
    workload = " ".join(overrides) or "default config"
    threads = os.environ.get("OMP_NUM_THREADS", "cores / ranks")
    print(f"\n{workload}: medians of {args.steps} steps after {args.warmup} warm-up; "
          f"{os.cpu_count()} CPUs, {torch.cuda.device_count()} GPUs, threads per rank {threads}; "
          f"load average (1/5/15 min) {_load(load_before)} before, {_load(load_after)} after\n")
    print(format_table(rows))

    args.output.mkdir(parents=True, exist_ok=True)
    context = {
        "command": shlex.join(["python", "tools/bench.py", *argv]),
        "overrides": overrides, "steps": args.steps, "warmup": args.warmup,
        "cpu_count": os.cpu_count(), "gpu_count": torch.cuda.device_count(),
        "threads_per_rank": threads,
        "load_average_before": load_before, "load_average_after": load_after,
    }
    write_csv(rows, args.output / "bench.csv")
    write_json(rows, context, args.output / "bench.json")
    title = (f"{workload}: median of {args.steps} steps after {args.warmup} warm-up\n"
             "bar labels: tokens/s per device over the bare loop's")
    plot_tokens_per_s(rows, title, args.output / "bench.png")
    print(f"\nbench: wrote bench.csv, bench.json and bench.png to {args.output}")
    return 1 if any(row.error for row in rows) else 0


def _load(averages) -> str:
    return "/".join(f"{value:.2f}" for value in averages)


if __name__ == "__main__":
    sys.exit(main())
