"""`dry_run=true`: validate a plan and report its size and cost without building anything."""

import json
import os

from llmscale.config.load import REPO_ROOT
from llmscale.config.schema import LLMScaleConfig, Precision
from llmscale.config.validate import ParallelPlan, validate
from llmscale.data import build_tokenizer
from llmscale.models import count_parameters, flops_per_token
from llmscale.parallel.deepspeed_config import build_deepspeed_config
from llmscale.train.data_setup import resolve_vocab_size


def model_state_bytes_per_device(parameters: int, plan: ParallelPlan, precision: Precision) -> float:
    """Weights, gradients and AdamW state per device under ZeRO (Rajbhandari et al., 2020):
    16 bytes a parameter in all (bf16: 2 weight + 2 gradient + 12 fp32 master and moments;
    fp32: 4 + 4 + 8), of which ZeRO-1 shards the optimizer part, ZeRO-2 also the gradients and
    ZeRO-3 everything over the data-parallel group. Activations come on top."""
    weight, grad = (2, 2) if precision == Precision.bf16 else (4, 4)
    optimizer = 16 - weight - grad
    shard = parameters / (plan.tp * plan.pp)
    sharded_by_stage = {
        0: weight + grad + optimizer,
        1: weight + grad + optimizer / plan.dp,
        2: weight + (grad + optimizer) / plan.dp,
        3: (weight + grad + optimizer) / plan.dp,
    }
    return shard * sharded_by_stage[plan.zero_stage]


def describe_dry_run(cfg: LLMScaleConfig) -> str:
    model_parallel = cfg.parallel.tp * cfg.parallel.pp
    world_size = int(os.environ.get("WORLD_SIZE", (cfg.parallel.dp or 1) * model_parallel))
    plan = validate(cfg, world_size)
    if cfg.model.vocab_size is None:
        vocab = build_tokenizer(cfg.tokenizer, REPO_ROOT).vocab_size
        cfg.model.vocab_size = resolve_vocab_size(cfg.model, vocab)
    parameters = count_parameters(cfg.model)
    per_token = flops_per_token(cfg.model, cfg.data.seq_len)
    tokens_per_step = plan.global_batch_size * cfg.data.seq_len
    states = model_state_bytes_per_device(parameters, plan, cfg.train.precision)
    lines = [
        f"experiment {cfg.name}: model {cfg.model.name}, {parameters:,} parameters "
        f"({parameters / 1e9:.2f}B)",
        f"  training FLOPs per token: {per_token:.4g} (seq_len {cfg.data.seq_len})",
        f"  plan: {plan.describe()}",
        f"  tokens per step: {tokens_per_step:,}; over {cfg.train.max_steps:,} steps: "
        f"{tokens_per_step * cfg.train.max_steps:,} tokens, "
        f"{per_token * tokens_per_step * cfg.train.max_steps:.3g} FLOPs",
        f"  model states per device ({cfg.train.precision.value}, ZeRO-{plan.zero_stage}): "
        f"{_human_bytes(states)}, before activations",
        "  DeepSpeed config: " + json.dumps(build_deepspeed_config(cfg, plan)),
    ]
    return "\n".join(lines)


def _human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"
