"""Measured peak memory of a training step against llmscale/parallel/memory_plan.py's estimate.

    python tools/measure_memory.py [--quick] [--tensor-parallel | --adapters]

For each model, sequence length, micro-batch and activation checkpointing mode of a small
matrix, one process runs a torch AdamW step (forward, backward, clipping, step) of the Llama
model on CPU and measures the bytes of live tensors with the profiler's allocation events
(llmscale.bench.measured_memory), then prints the estimate, the measurement and the error: of the
step's peak (weights, gradients, optimizer state, activations and temporaries at the fullest
moment), of the activations the forward pass saves, and of what the step adds to the states
(all but the weights, the optimizer state and kept buffers). bf16 rows compare the activations
and, where the fullest moment is in the backward pass, the step (see `check_estimate`).
--tensor-parallel runs the matrix for tp 2, without and with sequence parallelism: the script
starts itself on 2 ranks under torchrun (or runs under yours), each rank builds the model from
the same seed and measures its share (Megatron's layers, plain torch AdamW, as above), and the
rank that measures the most is compared with the estimate of that plan. Takes a few minutes on
2 cores; --quick runs the first 5 rows (the tiny model's).
--adapters compares fine-tuning every weight with LoRA and QLoRA (rank 8 on every projection):
the tiny model and SmolLM2-135M's shape, seq 256, fp32; --quick the tiny model's rows.
"""

import argparse
import importlib.util
import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

if importlib.util.find_spec("llmscale") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from llmscale.bench.measured_memory import (  # noqa: E402
    AllocationTrace,
    EstimateCheck,
    check_estimate,
    check_parallel_estimate,
)
from llmscale.config.schema import (  # noqa: E402
    ActivationCheckpointing, AdapterConfig, AdapterKind, ModelConfig, Precision,
)

MiB = 2**20
TP = 2
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
# A narrow MLP (i = h): the norms' backward, not SwiGLU's, is a layer's fullest at tp 2.
SQUAT = ModelConfig(name="squat", hidden_size=256, num_layers=3, num_heads=4, num_kv_heads=2,
                    intermediate_size=256, vocab_size=1024, max_seq_len=512)
# The tiny model with an intermediate size of whole NF4 blocks, and SmolLM2-135M's shape
# (conf/model/smollm2_135m.yaml), fine-tuned whole, with LoRA and with QLoRA (--adapters).
TINY_NF4 = ModelConfig(name="tiny", hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=384, vocab_size=320, max_seq_len=512,
                       tie_embeddings=True)
SMOLLM2 = ModelConfig(name="smol", hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                      intermediate_size=1536, vocab_size=49152, max_seq_len=512,
                      rope_theta=100000.0, tie_embeddings=True)
ADAPTERS = {"full": None,
            "lora": AdapterConfig(kind=AdapterKind.lora, rank=8, alpha=16.0, dropout=0.0),
            "qlora": AdapterConfig(kind=AdapterKind.qlora, rank=8, alpha=16.0, dropout=0.0)}
ADAPTER_MATRIX = [(model, seq, micro, kind) for model, seq, micro in
                  [(TINY_NF4, 256, 8), (SMOLLM2, 256, 2)] for kind in ADAPTERS]
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
# Every row without and with sequence parallelism. tp 2 splits whole heads: DEEP's single KV
# head cannot be. Not selective checkpointing without sequence parallelism: it keeps the
# row-parallel layers' all-reduced outputs in its cache (llmscale.parallel.
# activation_checkpointing), whose frees the allocation trace does not see.
TP_MATRIX = [
    (model, seq, micro, mode, precision, sequence_parallel)
    for model, seq, micro, precision in [
        (TINY, 256, 8, Precision.fp32), (SMALL, 512, 4, Precision.fp32),
        (SMALL, 128, 8, Precision.fp32), (WIDE, 256, 4, Precision.fp32),
        (SQUAT, 256, 4, Precision.fp32), (TINY, 256, 8, Precision.bf16)]
    for sequence_parallel in (False, True)
    for mode in MODES
    if sequence_parallel or mode is not ActivationCheckpointing.selective
]


def method_check() -> str:
    """The measurement must read a known allocation exactly."""
    with AllocationTrace() as trace, trace.phase("check"):
        block = torch.empty(64 * MiB, dtype=torch.uint8)
        del block
    return f"method check: a 64 MiB tensor reads {trace.peak('check') / MiB:.2f} MiB"


def header(tensor_parallel: bool) -> str:
    sp = f" {'sp':<3}" if tensor_parallel else ""
    return (f"{'model':<6} {'seq':>4} {'mb':>3} {'ckpt':<9} {'dtype':<5}{sp} | {'est MiB':>8} "
            f"{'meas MiB':>8} {'err':>6} | {'act est':>8} {'act meas':>8} {'err':>6} | "
            f"{'step err':>8} | moment")


def row(check: EstimateCheck, model: ModelConfig, seq: int, micro: int,
        mode: ActivationCheckpointing, precision: Precision, sequence_parallel=None) -> str:
    """One line of the table; '-' where the measurement cannot compare (see `check_estimate`)."""
    est, meas = check.estimate, check.measured
    sp = "" if sequence_parallel is None else f" {'on' if sequence_parallel else 'off':<3}"
    line = f"{model.name:<6} {seq:>4} {micro:>3} {mode.value:<9} {precision.value:<5}{sp} | "
    if precision == Precision.fp32:
        line += f"{est.total / MiB:>8.2f} {meas.peak / MiB:>8.2f} {check.error:>+6.1%} | "
    else:
        line += f"{'-':>8} {'-':>8} {'-':>6} | "
    line += (f"{est.activations / MiB:>8.2f} {meas.activations / MiB:>8.2f} "
             f"{check.activation_error:>+6.1%} | ")
    step_compares = precision == Precision.fp32 or est.moment != "optimizer step"
    line += f"{check.step_error:>+8.1%} | " if step_compares else f"{'-':>8} | "
    return line + est.moment


def single_process(quick: bool) -> int:
    print(method_check())
    print(header(False))
    print("-" * len(header(False)))
    worst = 0.0
    for model, seq, micro, mode, precision in MATRIX[:6] if quick else MATRIX:
        check = check_estimate(model, seq, micro, mode, precision)
        if precision == Precision.fp32:
            worst = max(worst, abs(check.error))
        print(row(check, model, seq, micro, mode, precision), flush=True)
    print(f"worst error of the fp32 peaks: {worst:.1%}")
    return 0


def adapter_rows(quick: bool) -> int:
    """Fine-tuning every weight, LoRA and QLoRA (rank 8, all projections), fp32, no
    checkpointing; the states column: weights (NF4 for QLoRA's base) and AdamW state."""
    print(method_check())
    print(f"{'train':<6} {header(False)} | {'states est':>10} {'meas':>8}")
    print("-" * (len(header(False)) + 28))
    worst = 0.0
    mode = ActivationCheckpointing.none
    for model, seq, micro, kind in ADAPTER_MATRIX[:3] if quick else ADAPTER_MATRIX:
        check = check_estimate(model, seq, micro, mode, Precision.fp32, ADAPTERS[kind])
        worst = max(worst, abs(check.error))
        states = check.estimate.parameters + check.estimate.optimizer
        print(f"{kind:<6} {row(check, model, seq, micro, mode, Precision.fp32)} | "
              f"{states / MiB:>10.2f} {check.measured.states / MiB:>8.2f}", flush=True)
    print(f"worst error of the peaks: {worst:.1%}")
    return 0


def tensor_parallel(quick: bool) -> int:
    """On every rank of torchrun's TP ranks; rank 0 prints."""
    import torch.distributed as dist

    from llmscale.parallel.distributed import init_distributed

    # Megatron 0.16 calls torch's all_gather_into_tensor and reduce_scatter_tensor, which warn.
    warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
    context = init_distributed()
    if context.world_size != TP:
        print(f"measure_memory: error: --tensor-parallel needs {TP} ranks, "
              f"not {context.world_size}", file=sys.stderr)
        return 2
    out = sys.stdout if context.is_main else io.StringIO()
    print(method_check(), file=out)
    print(f"tp {TP}, dp 1, pp 1, ZeRO-0: the rank that measures the most", file=out)
    print(header(True), file=out)
    print("-" * len(header(True)), file=out)
    worst = 0.0
    for model, seq, micro, mode, precision, sp in TP_MATRIX[:5] if quick else TP_MATRIX:
        check = check_parallel_estimate(model, seq, micro, mode, sp, precision)
        if precision == Precision.fp32:
            worst = max(worst, abs(check.error))
        print(row(check, model, seq, micro, mode, precision, sp), file=out, flush=True)
    print(f"worst error of the fp32 peaks: {worst:.1%}", file=out)
    dist.destroy_process_group()
    return 0


def launch_ranks(argv) -> int:
    """This script again, on TP ranks of one machine."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(TP), __file__, *argv]
    # As llmscale's launches set it for tensor-parallel plans (Megatron warns without it).
    env = {**os.environ, "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    return subprocess.run(command, env=env).returncode


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="measure_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="only the first rows (the tiny model's)")
    parser.add_argument("--tensor-parallel", action="store_true",
                        help=f"tp {TP} rows, on {TP} ranks (starts them under torchrun)")
    parser.add_argument("--adapters", action="store_true",
                        help="full fine-tuning against LoRA and QLoRA: the tiny model and "
                             "SmolLM2-135M's shape")
    args = parser.parse_args(argv)
    if args.adapters:
        return adapter_rows(args.quick)
    if not args.tensor_parallel:
        return single_process(args.quick)
    if "LOCAL_RANK" not in os.environ:
        return launch_ranks(argv)
    return tensor_parallel(args.quick)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
