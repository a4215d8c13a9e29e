"""llmscale's training step time next to a bare PyTorch loop on the same model, data and AdamW.

    python tools/bench_overhead.py +exp=tiny [key=value ...] [--steps 30] [--warmup 5]

Both sides run in one process with the same thread count, from the same initial weights
(seeded as `pretrain` seeds them), on the same micro-batches (`rank_micro_batches`), with the
same AdamW and param groups (`build_optimizer`), LR schedule and gradient clipping.

- llmscale: the DeepSpeed engine from `build_engine`, driven by `train_step`, the step
  `pretrain`'s loop runs (llmscale/train/step.py), plus its get_lr and get_global_grad_norm.
  Only the metric sinks are left out (no console/JSONL/TensorBoard writes).
- bare: `BareLoop` (llmscale/train/bare_loop.py), the loop tools/bench.py also measures against.

Steps alternate (llmscale, bare, llmscale, ...) so drift hits both alike; batch collation is
outside both timers and the copy to the device inside, as in the trainer's own tokens/s. The
per-step losses of the two loops are compared to show they do the same work. The headline ratio
comes from these interleaved steps.

Afterwards the real `pretrain` runs the same steps (its console output hidden; JSONL on, other
sinks, evaluation and checkpoints off or at the end) and the step times of its own timer
(`tokens_per_s` in metrics.jsonl) and its losses are printed: a check that the replayed sequence
is what the trainer does. That run is not interleaved, so on a busy machine its ratio drifts.
The thread count is the trainer's (`init_distributed`); set OMP_NUM_THREADS to choose another.
"""

import argparse
import contextlib
import copy
import importlib.util
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

if importlib.util.find_spec("llmscale") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmscale.config.load import load_config  # noqa: E402
from llmscale.config.validate import validate  # noqa: E402
from llmscale.models import Llama  # noqa: E402
from llmscale.parallel.distributed import init_distributed  # noqa: E402
from llmscale.parallel.engine import build_engine  # noqa: E402
from llmscale.train.bare_loop import BareLoop, load_training_batches  # noqa: E402
from llmscale.train.step import train_step  # noqa: E402
from llmscale.train.trainer import pretrain, seed_everything  # noqa: E402


def llmscale_step(engine, batches, device: torch.device) -> float:
    """The body of `pretrain`'s loop, minus the metric sinks."""
    engine.get_lr()
    loss, _ = train_step(engine, batches, device, judge=lambda loss: None)
    float(engine.get_global_grad_norm() or 0.0)
    return loss


def timed(fn, *args):
    start = time.perf_counter()
    loss = fn(*args)
    return time.perf_counter() - start, loss


def report(name: str, seconds, tokens_per_step: int) -> float:
    ms = 1e3 * statistics.median(seconds)
    print(f"{name:<26} {ms:9.2f} ms/step  {tokens_per_step / ms * 1e3:12,.0f} tokens/s")
    return ms


def main(argv) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(overrides)
    total = args.warmup + args.steps
    cfg.train.max_steps, cfg.train.exit_at_step = total, None  # the LR schedule both loops follow

    ctx = init_distributed()  # sets the CPU thread count both loops then share
    plan = validate(cfg, ctx.world_size)
    data = load_training_batches(cfg, plan, ctx.rank)
    seed_everything(cfg.train.seed)
    model = Llama(cfg.model)
    bare = BareLoop(copy.deepcopy(model), cfg, ctx.device)  # before DeepSpeed flattens anything
    engine = build_engine(model, cfg, plan)
    tokens_per_step = plan.global_batch_size * cfg.data.seq_len
    print(f"{plan.describe()}; seq_len {cfg.data.seq_len}; "
          f"{sum(p.numel() for p in bare.model.parameters()):,} parameters; "
          f"{torch.get_num_threads()} threads; {args.warmup} warm-up + {args.steps} timed steps")

    times = {"llmscale": [], "bare": []}
    losses = {"llmscale": [], "bare": []}
    for step in range(total):
        batches = data.for_step(step)
        runs = {"llmscale": (llmscale_step, engine, batches, ctx.device),
                "bare": (bare.step, batches)}
        for name in (["llmscale", "bare"] if step % 2 else ["bare", "llmscale"]):
            seconds, loss = timed(*runs[name])
            losses[name].append(loss)
            if step >= args.warmup:
                times[name].append(seconds)

    diffs = [abs(a - b) for a, b in zip(losses["llmscale"], losses["bare"])]
    print(f"loss, step 1 .. {total}: llmscale {losses['llmscale'][0]:.6f} .. "
          f"{losses['llmscale'][-1]:.6f}; max |llmscale - bare| over the first 5 steps "
          f"{max(diffs[:5]):.2e}, over all {max(diffs):.2e}")
    ours = report("llmscale (trainer's calls)", times["llmscale"], tokens_per_step)
    base = report("bare PyTorch", times["bare"], tokens_per_step)
    paired = statistics.median(a / b for a, b in zip(times["llmscale"], times["bare"]))
    print(f"ratio llmscale/bare {ours / base:.3f}: overhead {100 * (ours / base - 1):+.1f}% "
          f"(target <= 5%); median of per-step ratios {paired:.3f}")

    with tempfile.TemporaryDirectory() as run_dir:  # the real loop, its own timer
        cfg.train.run_dir, cfg.train.resume, cfg.name = run_dir, "none", "bench_overhead"
        cfg.train.eval_interval = cfg.train.log_interval = total
        cfg.checkpoint.interval, cfg.checkpoint.save_final = 0, False
        cfg.logging.jsonl, cfg.logging.tensorboard, cfg.logging.wandb = True, False, False
        cfg.logging.progress_bar = False
        with contextlib.redirect_stdout(io.StringIO()):
            pretrain(cfg)
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    steps = [r for r in map(json.loads, lines) if "tokens_per_s" in r]
    real = report("pretrain() (own timer)",
                  [tokens_per_step / r["tokens_per_s"] for r in steps[args.warmup:]],
                  tokens_per_step)
    real_diff = max(abs(r["loss"] - b) for r, b in zip(steps, losses["bare"]))
    print(f"pretrain() vs bare: ratio {real / base:.3f}, max loss diff {real_diff:.2e} "
          "(not interleaved: run after the loops above)")


if __name__ == "__main__":
    main(sys.argv[1:])
