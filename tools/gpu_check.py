"""The device check: the real entry point on a GPU, save and resume there, and the single-GPU
benchmark, everything written to one folder.

    python tools/gpu_check.py OUT_DIR [--cpu-rehearsal] [--skip STAGE ...]

Stages, each a subprocess with its own time limit, so one failure still leaves the others'
results:
  smoke    `python launch/pretrain.py +exp=tiny` in bf16 on cuda:0 (NCCL), 50 steps; the loss must
           fall.
  resume   the same run stopped at step 25 (train.exit_at_step) and relaunched: its losses for
           steps 26-50 against the uninterrupted run's (bf16: within 1e-2 relative).
  bench    tools/bench_overhead.py for the 125M model at sequence 1024 and the 1.3B one at 2048
           (the 1b experiment if --with-1b), each micro-batch size against the bare loop.
OUT_DIR gets summary.json, bench.csv, bench.png and each stage's log. `--cpu-rehearsal` runs
the same stages on the CPU with the tiny model in fp32, to try the script before device time is
spent on it.
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

REPO_ROOT = Path(__file__).resolve().parents[1]
QUIET = ["logging.tensorboard=false", "logging.progress_bar=false"]
# (name, overrides, micro-batch sizes, time limit s): the GPU benchmark, then its CPU rehearsal.
GPU_BENCH = [
    ("125m_seq1024", ["+exp=125m", "data.seq_len=1024"], [32, 64], 150),
    ("1_3b_seq2048", ["+exp=1_3b"], [16], 130),
]
GPU_BENCH_1B = ("1b_seq2048", ["+exp=1b"], [8], 130)
CPU_BENCH = [
    ("tiny_seq128", ["+exp=tiny", "model.vocab_size=512"], [4, 8], 300),
    ("tiny_seq64", ["+exp=tiny", "data.seq_len=64"], [8], 300),
]
# Every benchmark run: one process at ZeRO-0 (nothing to shard), byte tokens with the model's own
# vocabulary size (the speed is the model's; the loss values do not matter).
BENCH_COMMON = ["tokenizer=byte", "data=shakespeare", "parallel.zero_stage=0"]


def run_stage(name: str, command: List[str], out: Path, timeout: int) -> Dict:
    """Runs `command`, its output to OUT/<name>.log; returns its status and duration."""
    start = time.time()
    log = out / f"{name}.log"
    print(f"gpu_check: {name}: {' '.join(command)}", flush=True)
    with log.open("w") as output:
        try:
            code = subprocess.run(command, cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    seconds = round(time.time() - start, 1)
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        print(f"gpu_check: {name} failed ({code}) after {seconds} s:\n  " + "\n  ".join(tail),
              flush=True)
    return {"exit": code, "seconds": seconds}


def losses(run_dir: Path) -> Dict[int, float]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r and "tokens_per_s" in r}


def smoke_and_resume(out: Path, precision: List[str], skip: List[str], slow: int) -> Dict:
    """`slow`: a factor on the time limits (a loaded CPU)."""
    script = [sys.executable, str(REPO_ROOT / "launch" / "pretrain.py"), "+exp=tiny", *QUIET,
              "train.max_steps=50", "checkpoint.interval=25", "train.eval_interval=25",
              *precision]
    result: Dict = {}
    reference = out / "runs" / "smoke"
    if "smoke" not in skip:
        result["smoke"] = run_stage("smoke", [*script, f"train.run_dir={reference}"], out,
                                    150 * slow)
        curve = losses(reference)
        result["smoke"].update(steps=len(curve), first_loss=curve.get(1), last_loss=curve.get(50),
                               passed=len(curve) == 50 and curve[50] < curve[1] - 0.5)
    if "resume" not in skip:
        resumed = out / "runs" / "resume"
        first = run_stage("resume_part1", [*script, f"train.run_dir={resumed}",
                                           "train.exit_at_step=25"], out, 100 * slow)
        second = run_stage("resume_part2", [*script, f"train.run_dir={resumed}"], out,
                           100 * slow)
        ours, reference_curve = losses(resumed), losses(reference)
        after = [step for step in range(26, 51) if step in ours and step in reference_curve]
        differences = [abs(ours[s] - reference_curve[s]) / abs(reference_curve[s])
                       for s in after]
        result["resume"] = {
            "exit": [first["exit"], second["exit"]], "seconds": first["seconds"] + second["seconds"],
            "steps_compared": len(after), "bitwise_equal": all(d == 0 for d in differences),
            "max_relative_difference": max(differences, default=None),
            "passed": len(after) == 25 and max(differences) < 1e-2,
        }
    return result


def bench(out: Path, configs, precision: List[str], steps: int, warmup: int,
          pretrain_check: List[str], profile: bool) -> Dict:
    result = {}
    for name, overrides, micro_sizes, timeout in configs:
        folder = out / f"bench_{name}"
        command = [sys.executable, str(REPO_ROOT / "tools" / "bench_overhead.py"), *overrides,
                   *BENCH_COMMON, *precision, "--micro-batch-sizes", *map(str, micro_sizes),
                   "--steps", str(steps), "--warmup", str(warmup), "--output", str(folder),
                   *pretrain_check, *(["--profile"] if profile else [])]
        result[name] = run_stage(f"bench_{name}", command, out, timeout)
        report = folder / "overhead.json"
        result[name]["rows"] = json.loads(report.read_text())["rows"] if report.exists() else []
    return result


def write_bench_table(bench_result: Dict, out: Path) -> List[Dict]:
    rows = [row for stage in bench_result.values() for row in stage["rows"]]
    columns = ["model", "seq_len", "micro_batch_size", "tokens_per_s", "bare_tokens_per_s",
               "vs_bare", "tflops", "mfu", "bare_mfu", "pretrain_tokens_per_s", "pretrain_mfu",
               "pretrain_peak_memory_gib", "max_loss_diff"]
    with (out / "bench.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        writer.writerows([[row.get(column) for column in columns] for row in rows])
    for row in rows:
        mfu = f"{row['mfu']:.1%}" if row.get("mfu") is not None else "n/a"
        bare_mfu = f"{row['bare_mfu']:.1%}" if row.get("bare_mfu") is not None else "n/a"
        memory = row.get("pretrain_peak_memory_gib") or (
            row["step_memory_gib"] + row["resident_memory_gib"] if row.get("step_memory_gib")
            else None)
        print(f"  {row['model']:>6} seq {row['seq_len']:5} micro {row['micro_batch_size']:3}: "
              f"{row['tokens_per_s']:11,.0f} tok/s, {row['tflops']:7.1f} TFLOP/s, MFU {mfu} "
              f"(bare {bare_mfu}), vs bare {row['vs_bare']:.3f}, peak "
              f"{'n/a' if memory is None else f'{memory:.1f}'} GiB")
    return rows


def plot(rows: List[Dict], title: str, path: Path) -> None:
    from matplotlib.figure import Figure

    labels = [f"{row['model']}\nseq {row['seq_len']}\nmicro {row['micro_batch_size']}"
              for row in rows]
    figure = Figure(figsize=(max(6.0, 1.4 * len(rows) + 2), 4.5), layout="constrained")
    axes = figure.subplots()
    positions = range(len(rows))
    ours = axes.bar([p - 0.2 for p in positions], [row["tflops"] for row in rows], 0.4,
                    label="llmscale")
    axes.bar([p + 0.2 for p in positions], [row["bare_tflops"] for row in rows], 0.4,
             label="bare PyTorch loop")
    axes.bar_label(ours, [f"{row['vs_bare']:.2f}x" for row in rows], fontsize=8)
    axes.set_xticks(list(positions), labels, fontsize=8)
    axes.set_ylabel("TFLOP/s per device (6N + 12LHS per token)")
    axes.set_title(title + "\nbar labels: llmscale tokens/s over the bare loop's", fontsize=10)
    axes.legend(fontsize=8)
    figure.savefig(path, dpi=120)


def main(argv) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--cpu-rehearsal", action="store_true",
                        help="the same stages on a CPU: tiny models, fp32")
    parser.add_argument("--skip", nargs="*", default=[], choices=["smoke", "resume", "bench"])
    parser.add_argument("--with-1b", action="store_true", help="also the 1b experiment")
    parser.add_argument("--steps", type=int, default=10, help="timed benchmark steps per loop")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--pretrain-check", action="store_true",
                        help="also time the real trainer after each benchmark's loops")
    parser.add_argument("--profile", action="store_true",
                        help="profile 3 steps of each benchmark loop (bench_*/profile_*.txt)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    import torch

    device = "CPU" if args.cpu_rehearsal else torch.cuda.get_device_name(0)
    precision = [] if args.cpu_rehearsal else ["train.precision=bf16"]
    if args.cpu_rehearsal:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the subprocesses too
    summary = {"device": device, "torch": torch.__version__,
               **smoke_and_resume(args.out, precision, args.skip,
                                          slow=4 if args.cpu_rehearsal else 1)}
    if "bench" not in args.skip:
        configs = CPU_BENCH if args.cpu_rehearsal else GPU_BENCH + (
            [GPU_BENCH_1B] if args.with_1b else [])
        summary["bench"] = bench(args.out, configs, precision, args.steps, args.warmup,
                                 [] if args.pretrain_check else ["--no-pretrain-check"],
                                 args.profile)
        print(f"gpu_check: benchmark on {device}:")
        rows = write_bench_table(summary["bench"], args.out)
        if rows:
            plot(rows, f"llmscale vs a bare PyTorch loop on {device}", args.out / "bench.png")
    summary["seconds"] = round(time.time() - started, 1)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    for stage in ("smoke", "resume"):
        if stage in summary:
            print(f"gpu_check: {stage}: " + json.dumps(
                {k: v for k, v in summary[stage].items() if k != "rows"}))
    print(f"gpu_check: done in {summary['seconds']} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
