"""`dry_run=true`: validate a plan and report its size and cost without building anything."""

import json
import os

from llmscale.config.schema import LLMScaleConfig
from llmscale.config.validate import validate
from llmscale.data.build import fill_in_vocab_size
from llmscale.models import count_parameters, flops_per_token
from llmscale.parallel.deepspeed_config import build_deepspeed_config
from llmscale.parallel.memory_plan import estimate


def describe_dry_run(cfg: LLMScaleConfig) -> str:
    model_parallel = cfg.parallel.tp * cfg.parallel.pp
    world_size = int(os.environ.get("WORLD_SIZE", (cfg.parallel.dp or 1) * model_parallel))
    plan = validate(cfg, world_size)
    fill_in_vocab_size(cfg)
    parameters = count_parameters(cfg.model)
    per_token = flops_per_token(cfg.model, cfg.data.seq_len)
    tokens_per_step = plan.global_batch_size * cfg.data.seq_len
    memory = estimate(cfg.model, plan, cfg.data.seq_len, cfg.train.precision,
                      plan.activation_checkpointing, cfg.adapter)
    lines = [
        f"experiment {cfg.name}: model {cfg.model.name}, {parameters:,} parameters "
        f"({parameters / 1e9:.2f}B)",
        f"  training FLOPs per token: {per_token:.4g} (seq_len {cfg.data.seq_len})",
        f"  plan: {plan.describe()}",
        f"  tokens per step: {tokens_per_step:,}; over {cfg.train.max_steps:,} steps: "
        f"{tokens_per_step * cfg.train.max_steps:,} tokens, "
        f"{per_token * tokens_per_step * cfg.train.max_steps:.3g} FLOPs",
        f"  memory per device ({cfg.train.precision.value}, ZeRO-{plan.zero_stage}, "
        f"activation checkpointing {plan.activation_checkpointing.value}; pipeline stage "
        f"{memory.stage}): weights {_human_bytes(memory.parameters)}, "
        f"gradients {_human_bytes(memory.gradients)}, optimizer "
        f"{_human_bytes(memory.optimizer)}, activations {_human_bytes(memory.activations)}, "
        f"total {_human_bytes(memory.total)} (tools/plan.py compares plans)",
        "  DeepSpeed config: " + json.dumps(build_deepspeed_config(cfg, plan)),
    ]
    return "\n".join(lines)


def _human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"
