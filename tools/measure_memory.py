"""Measured peak memory of a training step against llmscale/parallel/memory_plan.py's estimate.

    python tools/measure_memory.py [--quick]

For each model, sequence length, micro-batch and activation checkpointing mode of a small
matrix, one process runs a torch AdamW step (forward, backward, clipping, step) of the Llama
model on CPU and measures the bytes of live tensors with the profiler's allocation events
(llmscale.train.memory), then prints the estimate, the measurement and the error: of the
step's peak (weights, gradients, optimizer state, activations and temporaries at the fullest
moment) and of the activations the forward pass saves. bf16 rows compare the activations
only (see `check_estimate`). Takes a few minutes on 2 cores; --quick runs the first rows.
"""

import argparse
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("llmscale") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from llmscale.config.schema import ActivationCheckpointing, ModelConfig, Precision  # noqa: E402
from llmscale.train.memory import AllocationTrace, check_estimate  # noqa: E402

MiB = 2**20
# conf/model/tiny.yaml with the byte tokenizer's vocabulary padded to 320.
TINY = ModelConfig(name="tiny", hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                   intermediate_size=352, vocab_size=320, max_seq_len=512, tie_embeddings=True)
SMALL = ModelConfig(name="small", hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
                    intermediate_size=704, vocab_size=320, max_seq_len=512, tie_embeddings=True)
# Wider, multi-head attention, an untied 8k vocabulary (a sentencepiece tokenizer's).
WIDE = ModelConfig(name="wide", hidden_size=512, num_layers=4, num_heads=8,
                   intermediate_size=1408, vocab_size=8192, max_seq_len=512)
DEEP = ModelConfig(name="deep", hidden_size=128, num_layers=8, num_heads=4, num_kv_heads=1,
                   intermediate_size=352, vocab_size=320, max_seq_len=512, tie_embeddings=True)
MODES = list(ActivationCheckpointing)
MATRIX = (
    [(TINY, 256, 8, mode, Precision.fp32) for mode in MODES]
    + [(SMALL, 512, 4, mode, Precision.fp32) for mode in MODES]
    + [(TINY, 512, 8, mode, Precision.fp32) for mode in MODES]
    + [(SMALL, 128, 8, mode, Precision.fp32) for mode in MODES]
    + [(WIDE, 256, 4, mode, Precision.fp32) for mode in MODES]
    + [(DEEP, 256, 2, mode, Precision.fp32) for mode in MODES]
    + [(TINY, 256, 8, mode, Precision.bf16) for mode in MODES]
)


def method_check() -> str:
    """The measurement must read a known allocation exactly."""
    with AllocationTrace() as trace, trace.phase("check"):
        block = torch.empty(64 * MiB, dtype=torch.uint8)
        del block
    return f"method check: a 64 MiB tensor reads {trace.peak('check') / MiB:.2f} MiB"


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="measure_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the first 6 rows")
    args = parser.parse_args(argv)
    print(method_check())
    header = (f"{'model':<6} {'seq':>4} {'mb':>3} {'ckpt':<9} {'dtype':<5} | {'est MiB':>8} "
              f"{'meas MiB':>8} {'err':>6} | {'act est':>8} {'act meas':>8} {'err':>6} | moment")
    print(header)
    print("-" * len(header))
    worst = 0.0
    for model, seq, micro, mode, precision in MATRIX[:6] if args.quick else MATRIX:
        check = check_estimate(model, seq, micro, mode, precision)
        est, meas = check.estimate, check.measured
        row = f"{model.name:<6} {seq:>4} {micro:>3} {mode.value:<9} {precision.value:<5} | "
        if precision == Precision.fp32:
            worst = max(worst, abs(check.error))
            row += f"{est.total / MiB:>8.2f} {meas.peak / MiB:>8.2f} {check.error:>+6.1%} | "
        else:
            row += f"{'-':>8} {'-':>8} {'-':>6} | "
        row += (f"{est.activations / MiB:>8.2f} {meas.activations / MiB:>8.2f} "
                f"{check.activation_error:>+6.1%} | {est.moment}")
        print(row, flush=True)
    print(f"worst error of the fp32 peaks: {worst:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
