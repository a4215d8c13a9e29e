"""Memory per device of the config's parallel plan, and the plans that fit the devices.

    python tools/plan.py +exp=70b [key=value ...] --world-size 512 --gpu-memory 80
        [--activation-checkpointing none|selective|full]

Hydra overrides come first. Prints the plan the config resolves to at --world-size ranks with
its weights, gradients, optimizer state, activations, temporaries and the fullest moment of the
step per device (llmscale/parallel/memory_plan.py says how each is estimated), whether it fits --gpu-memory GiB less a 10% margin,
then up to 10 plans that fit, cheapest first. Estimates, checked against the measured memory of
small models on CPU (tools/measure_memory.py), not of GPU runs.
"""

import argparse
import sys
from dataclasses import replace
from typing import List, Optional

from llmscale.config import load_config, validate
from llmscale.config.load import ConfigError
from llmscale.config.schema import ActivationCheckpointing, AdapterKind, LLMScaleConfig
from llmscale.data.build import fill_in_vocab_size
from llmscale.models import count_parameters
from llmscale.parallel.memory_plan import (
    MARGIN,
    GiB,
    RECOMPUTE_ORDER,
    MemoryEstimate,
    estimate,
    fitting_plans,
)

TOP_PLANS = 10
COLUMNS = ("parameters", "gradients", "optimizer", "activations", "temporaries", "total")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, required=True, help="ranks (GPUs) in the job")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per device")
    parser.add_argument("--activation-checkpointing", choices=[r.value for r in RECOMPUTE_ORDER],
                        help="recomputation of the config's plan (default: the config's "
                        "parallel.activation_checkpointing)")
    args, overrides = parser.parse_known_args(argv)
    unknown = [arg for arg in overrides if arg.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.world_size < 1:
        parser.error(f"--world-size={args.world_size} must be at least 1")
    if args.gpu_memory <= 0:
        parser.error(f"--gpu-memory={args.gpu_memory} must be positive (GiB per device)")
    try:
        cfg = load_config(overrides)
        plan = validate(cfg, args.world_size)
        fill_in_vocab_size(cfg)
    except ConfigError as error:
        print(f"plan: error: {error}", file=sys.stderr)
        return 2

    device_bytes = args.gpu_memory * GiB
    recompute = (ActivationCheckpointing(args.activation_checkpointing)
                 if args.activation_checkpointing else plan.activation_checkpointing)
    memory = estimate(cfg.model, plan, cfg.data.seq_len, cfg.train.precision, recompute,
                      cfg.adapter)
    budget = (1 - MARGIN) * args.gpu_memory
    verdict = "fits" if memory.fits(device_bytes) else "does NOT fit"
    print(f"experiment {cfg.name}: {count_parameters(cfg.model) / 1e9:.2f}B parameters, "
          f"seq_len {cfg.data.seq_len}, {cfg.train.precision.value}" + _adapter_note(cfg))
    described = replace(plan, activation_checkpointing=ActivationCheckpointing.none).describe()
    print(f"plan: {described}, activation checkpointing {recompute.value}")
    print(f"per device (pipeline stage {memory.stage}, the fullest), GiB:")
    for name in COLUMNS:
        print(f"  {name:<12} {getattr(memory, name) / GiB:9.2f}")
    print(f"  (total: the fullest moment of the step, the {memory.moment}; the parts are each "
          "one's most, which they do not all reach at once)")
    print(f"  {verdict} in {budget:.1f} of {args.gpu_memory:g} GiB ({MARGIN:.0%} kept for "
          "allocator fragmentation, workspaces, CUDA context and NCCL buffers)")
    # Under 1F1B, stage i of pp holds pp - i micro-batches' activations at once.
    in_flight = plan.pp - memory.stage
    per_mode = {mode: estimate(cfg.model, plan, cfg.data.seq_len, cfg.train.precision, mode,
                               cfg.adapter)
                for mode in ActivationCheckpointing}
    per_micro_batch = ", ".join(f"{mode.value} {each.activations / in_flight / GiB:.2f}"
                                for mode, each in per_mode.items())
    print(f"  activations of one micro-batch on stage {memory.stage} ({in_flight} in flight), "
          f"by recompute, GiB: {per_micro_batch}")

    options = fitting_plans(cfg, args.world_size, device_bytes)
    print(f"\nplans of {args.world_size} ranks that fit {budget:.1f} GiB: {len(options)}; "
          f"the cheapest {min(len(options), TOP_PLANS)} (smaller tp*pp, then less recompute, "
          "then lower ZeRO), GiB per device:")
    if options:
        print(f"  {'tp':>3} {'pp':>3} {'dp':>4} {'zero':>4} {'recompute':<9} "
              + " ".join(f"{name:>11}" for name in COLUMNS))
    for option in options[:TOP_PLANS]:
        p = option.plan
        print(f"  {p.tp:>3} {p.pp:>3} {p.dp:>4} {p.zero_stage:>4} {option.recompute.value:<9} "
              + _row(option.estimate))
    return 0


def _adapter_note(cfg: LLMScaleConfig) -> str:
    adapter = cfg.adapter
    if adapter.kind is AdapterKind.none:
        return ""
    base = "an NF4 base" if adapter.kind is AdapterKind.qlora else "a frozen base"
    return (f", {adapter.kind.value} rank {adapter.rank} on {len(adapter.target_modules)} "
            f"projections a layer ({base}: only the adapters have gradients and AdamW state)")


def _row(memory: MemoryEstimate) -> str:
    return " ".join(f"{getattr(memory, name) / GiB:>11.2f}" for name in COLUMNS)


if __name__ == "__main__":
    sys.exit(main())
