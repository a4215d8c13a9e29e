"""Benchmark parallel plans: every plan x micro-batch size is a real training run that torchrun
starts, read back from the run's metrics.jsonl, beside the bare PyTorch loop on the same workload.

A plan is one string of Hydra overrides (`parallel.zero_stage=3`) and short specs joined by '-':
dpN, tpN, ppN, zeroN (`dp2-zero1`, `zero3`, `"dp2-zero3 parallel.offload_optimizer=true"`). It runs
on dp x tp x pp ranks when it names dp, else on `nproc_per_node` ranks. Every run is validated
before the first one starts.

Each run takes `warmup + steps` steps in a temporary folder, without checkpoints; the figures are
medians over the last `steps`. Memory per rank: the trainer's `peak_memory_gib` where it logs one
(accelerators), and each rank process's peak RSS, read by the kernel's high-water mark (Linux).
"""

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import psutil
import torch

from llmscale.config.load import REPO_ROOT, ConfigError, load_config, to_yaml
from llmscale.config.schema import ParallelConfig
from llmscale.config.validate import validate
from llmscale.parallel.distributed import cpu_threads_per_rank

BARE = "bare PyTorch"
_SHORT_SPEC = re.compile(r"(dp|tp|pp|ep|zero)(\d+)")
_SHORT_SPEC_KEYS = {"dp": "parallel.dp", "tp": "parallel.tp", "pp": "parallel.pp",
                    "ep": "parallel.ep", "zero": "parallel.zero_stage"}
# The bare loop runs on one rank, whatever parallel layout its plan asked for.
_ONE_RANK = ("parallel.dp=1", "parallel.tp=1", "parallel.pp=1")
# What torchrun starts: the trainer, or the bare loop.
_PRETRAIN = (str(REPO_ROOT / "launch" / "pretrain.py"),)
_BARE_LOOP = ("-m", "llmscale.bench.bare_loop")
# Set by a launcher the benchmark itself may run under; its runs get their own from torchrun.
_LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                       "MASTER_PORT")
_SAMPLE_SECONDS = 0.2


def plan_overrides(spec: str) -> List[str]:
    """The Hydra overrides that a plan string stands for."""
    overrides = []
    for token in spec.split():
        if "=" in token:
            overrides.append(token)
            continue
        for part in token.split("-"):
            match = _SHORT_SPEC.fullmatch(part)
            if not match:
                raise ConfigError(
                    f"{part!r} is neither a Hydra override (key=value) nor one of dpN, tpN, "
                    "ppN, epN, zeroN (joined by '-', as in dp2-zero1 or tp2-pp2)"
                )
            overrides.append(f"{_SHORT_SPEC_KEYS[match[1]]}={match[2]}")
    if not overrides:
        raise ConfigError("the plan is empty: name one such as zero1 or dp2-zero3")
    return overrides


def run_settings(total_steps: int) -> List[str]:
    """A short run in a fresh folder: no checkpoints, one small evaluation at each end (outside
    the step timer), JSONL metrics only, a quiet console."""
    return [
        f"train.max_steps={total_steps}", "train.exit_at_step=null", "train.resume=none",
        f"train.eval_interval={total_steps}", "train.eval_batches=1",
        f"train.log_interval={total_steps}", "checkpoint.interval=0",
        "checkpoint.save_final=false", "logging.jsonl=true", "logging.tensorboard=false",
        "logging.wandb=false", "logging.progress_bar=false",
    ]


@dataclass(frozen=True)
class Run:
    plan: str  # as the user wrote it, or BARE
    overrides: Tuple[str, ...]  # every override but the run folder
    world_size: int
    micro_batch_size: int
    global_batch_size: int

    def command(self, run_dir: Path) -> List[str]:
        entry = _BARE_LOOP if self.plan == BARE else _PRETRAIN
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", str(self.world_size), *entry, *self.overrides,
                f"train.run_dir={run_dir}"]


@dataclass
class Measurement:
    """Medians over the measured steps (None: not logged) and each rank's peak RSS."""

    tokens_per_s: float
    tflops_per_device: float
    mfu: Optional[float]
    peak_memory_gib: Optional[float]
    rss_gib_per_rank: List[float]


@dataclass
class Row:
    """One line of the report. A device is a rank (a GPU; on CPU, a rank's share of the cores,
    as the trainer's TFLOP/s per device counts it). `vs_bare` is tokens/s per device over the bare
    loop's on one device: how close the plan runs to a bare single-device loop."""

    plan: str
    world_size: int
    micro_batch_size: int
    global_batch_size: int
    tokens_per_s: Optional[float] = None  # all ranks together
    tokens_per_s_per_device: Optional[float] = None
    tflops_per_device: Optional[float] = None
    mfu: Optional[float] = None
    peak_memory_gib: Optional[float] = None
    peak_rss_gib: Optional[float] = None
    bare_tokens_per_s: Optional[float] = None
    vs_bare: Optional[float] = None
    error: Optional[str] = None
    rss_gib_per_rank: List[float] = field(default_factory=list)
    overrides: List[str] = field(default_factory=list)


def plan_runs(overrides: Sequence[str], plans: Sequence[str],
              micro_batch_sizes: Sequence[Optional[int]], total_steps: int,
              nproc_per_node: int) -> Dict[Run, Run]:
    """Each plan x micro-batch run, mapped to the bare run it is compared with (one bare run per
    distinct workload). Every run is validated; all the problems are reported at once."""
    pairs: Dict[Run, Run] = {}
    bare_runs: Dict[str, Run] = {}
    errors = []
    for spec in plans:
        for micro in micro_batch_sizes:
            try:
                run_overrides = [*overrides, *plan_overrides(spec),
                                 *([f"train.micro_batch_size={micro}"] if micro else []),
                                 *run_settings(total_steps)]
                run, _ = _compose(spec, run_overrides, nproc_per_node)
                bare, bare_cfg = _compose(BARE, [*run_overrides, *_ONE_RANK], 1)
            except (ConfigError, NotImplementedError) as error:
                errors.append(f"plan {spec!r}" + (f", micro-batch {micro}" if micro else "")
                              + f": {error}")
                continue
            # The bare loop ignores the parallel settings: plans differing only there share one.
            workload = to_yaml(replace(bare_cfg, parallel=ParallelConfig()))
            pairs[run] = bare_runs.setdefault(workload, bare)
    if errors:
        raise ConfigError("\n".join(errors))
    return pairs


def _compose(plan: str, overrides: List[str], default_world_size: int):
    cfg = load_config(overrides)
    par = cfg.parallel
    # A plan naming no dp fills the node's ranks, or at least its model-parallel group.
    world_size = par.dp * par.tp * par.pp if par.dp else max(default_world_size, par.tp * par.pp)
    if torch.cuda.is_available() and world_size > torch.cuda.device_count():
        raise ConfigError(f"the plan runs on {world_size} ranks but this machine has "
                          f"{torch.cuda.device_count()} GPUs")
    resolved = validate(cfg, world_size)
    run = Run(plan, tuple(overrides), world_size, resolved.micro_batch_size,
              resolved.global_batch_size)
    return run, cfg


def benchmark(pairs: Dict[Run, Run], warmup: int, progress: Callable[[str], None]) -> List[Row]:
    """Runs every bare run, then every plan run, one at a time; the rows in that order.
    `progress` is told of each run as it starts, and of each failure."""
    runs = list(dict.fromkeys(pairs.values())) + list(pairs)
    results: Dict[Run, Measurement | str] = {}
    with tempfile.TemporaryDirectory(prefix="llmscale-bench-") as scratch:
        for index, run in enumerate(runs):
            progress(f"[{index + 1}/{len(runs)}] {run.plan}, micro-batch {run.micro_batch_size}, "
                     f"{run.world_size} rank(s)")
            results[run] = _measure(run, Path(scratch) / f"run{index:02d}", warmup)
            if isinstance(results[run], str):
                progress(f"  failed: {results[run]}")
    # A bare run is its own reference (vs_bare 1).
    return [measured_row(run, results[run], results[pairs.get(run, run)]) for run in runs]


def measured_row(run: Run, result: Measurement | str, bare_result: Measurement | str) -> Row:
    """The report line of a run, from its figures (or why it failed) and its bare run's."""
    row = Row(run.plan, run.world_size, run.micro_batch_size, run.global_batch_size,
              overrides=list(run.overrides))
    if isinstance(result, str):
        row.error = result
        return row
    row.tokens_per_s, row.tflops_per_device = result.tokens_per_s, result.tflops_per_device
    row.tokens_per_s_per_device = result.tokens_per_s / run.world_size
    row.mfu, row.peak_memory_gib = result.mfu, result.peak_memory_gib
    row.rss_gib_per_rank = result.rss_gib_per_rank
    row.peak_rss_gib = max(result.rss_gib_per_rank, default=None)
    if isinstance(bare_result, Measurement):
        # The bare loop runs on one device.
        row.bare_tokens_per_s = bare_result.tokens_per_s
        row.vs_bare = row.tokens_per_s_per_device / row.bare_tokens_per_s
    return row


def _measure(run: Run, run_dir: Path, warmup: int) -> Measurement | str:
    """The run's figures, or why it failed (the end of its output)."""
    run_dir.mkdir(parents=True)
    log = run_dir / "output.log"
    returncode, rss = _run_sampling_rss(run.command(run_dir), log, _environment(run.world_size))
    if returncode:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        return f"exit status {returncode}:\n" + "\n".join(tail)
    records = [record for record in map(json.loads, (run_dir / "metrics.jsonl").open())
               if "tokens_per_s" in record and record["step"] > warmup]
    if not records:
        return f"no step after the {warmup} warm-up steps in {run_dir / 'metrics.jsonl'}"

    return Measurement(**step_figures(records), rss_gib_per_rank=rss)


def step_figures(records: List[dict]) -> Dict[str, Optional[float]]:
    """The medians of the figures a run logged for its steps (None: never logged), and the
    largest peak memory."""
    def median(key: str) -> Optional[float]:
        values = [record[key] for record in records if key in record]
        return statistics.median(values) if values else None

    memory = [record["peak_memory_gib"] for record in records if "peak_memory_gib" in record]
    return {"tokens_per_s": median("tokens_per_s"),
            "tflops_per_device": median("tflops_per_device"), "mfu": median("mfu"),
            "peak_memory_gib": max(memory, default=None)}


def _environment(world_size: int) -> Dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in _LAUNCHER_VARIABLES}
    # torchrun gives each of several ranks one CPU thread; share the cores out as
    # `init_distributed` does under the other launchers, so every run has the whole machine.
    env.setdefault("OMP_NUM_THREADS", str(cpu_threads_per_rank(world_size)))
    return env


def _run_sampling_rss(command: List[str], log: Path, env: Dict[str, str]):
    """Runs torchrun to its end; returns its exit status and the peak RSS (GiB) of each of its
    ranks, its child processes. The kernel's high-water mark is read, not the current RSS, so
    sampling misses no peak reached before the last sample."""
    peaks: Dict[int, int] = {}  # local rank -> bytes
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=output,
                                   stderr=subprocess.STDOUT)
        launcher = psutil.Process(process.pid)
        while process.poll() is None:
            try:
                for rank in launcher.children():
                    local_rank = int(rank.environ()["LOCAL_RANK"])
                    peaks[local_rank] = max(peaks.get(local_rank, 0), _peak_rss_bytes(rank.pid))
            except (psutil.Error, OSError, KeyError):
                pass  # a process that is starting or has just exited
            time.sleep(_SAMPLE_SECONDS)
    return process.returncode, [peaks[rank] / 2**30 for rank in sorted(peaks)]


def _peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0  # a process that has exited keeps no memory figures
