"""The rules of the `adapter` settings, for `validate`."""

import importlib.util
from typing import Dict, List, Tuple

from llmscale.config.schema import (
    LLAMA_PROJECTIONS, NF4_BLOCK_SIZE, AdapterKind, LLMScaleConfig, ModelConfig,
)


def adapter_rules(cfg: LLMScaleConfig) -> List[str]:
    adapter, par = cfg.adapter, cfg.parallel
    if adapter.kind is AdapterKind.none:
        return []
    errors = []
    if adapter.rank <= 0:
        errors.append(f"adapter.rank={adapter.rank} must be positive (8 or 16 are usual)")
    if adapter.alpha <= 0:
        errors.append(f"adapter.alpha={adapter.alpha} must be positive (often twice the rank)")
    if not 0.0 <= adapter.dropout < 1.0:
        errors.append(f"adapter.dropout={adapter.dropout} must lie in [0, 1)")
    unknown = [name for name in adapter.target_modules if name not in LLAMA_PROJECTIONS]
    if unknown or not adapter.target_modules:
        errors.append(
            f"adapter.target_modules={list(adapter.target_modules)} must name one or more of a "
            f"Llama layer's projections {list(LLAMA_PROJECTIONS)}"
            + (f"; unknown: {unknown}" if unknown else "")
        )
    if adapter.kind is AdapterKind.qlora:
        errors += qlora_rules(cfg)
    if par.zero_stage == 3:
        errors.append(
            f"adapter.kind={adapter.kind.value} is supported at parallel.zero_stage 0, 1 or 2: "
            "ZeRO-3 would partition the frozen base too, which this build does not handle; "
            "use 1 or 2"
        )
    if cfg.model.num_experts:
        errors.append(
            f"adapter.kind={adapter.kind.value} wraps dense projections; an MoE model "
            f"(model.num_experts={cfg.model.num_experts}) is not supported: pick a dense model"
        )
    return errors


def qlora_rules(cfg: LLMScaleConfig) -> List[str]:
    """What QLoRA adds: torchao, no pipeline stages, dimensions (and, under tensor parallelism,
    each rank's shard of them) in whole blocks."""
    par, errors = cfg.parallel, []
    if importlib.util.find_spec("torchao") is None:
        errors.append("adapter.kind=qlora stores the base in NF4 with torchao: "
                      "pip install 'llmscale[qlora]'")
    if par.pp > 1:
        errors.append(
            f"adapter.kind=qlora is not supported with pipeline stages (parallel.pp={par.pp}): "
            "set parallel.pp=1 (tensor parallelism, parallel.tp, and ZeRO 0-2 are supported), "
            "or use adapter=lora"
        )
    widths = _projection_widths(cfg.model)
    sized = {field for module in cfg.adapter.target_modules for field in _SIZED_BY.get(module, ())}
    split: Dict[str, List[str]] = {}  # under tensor parallelism: width -> projections it splits
    for module in cfg.adapter.target_modules if par.tp > 1 else ():
        if module in _SPLIT_INPUT:
            split.setdefault(_SPLIT_INPUT[module], []).append(module)
    for field in sorted(sized):
        if widths[field] % NF4_BLOCK_SIZE:
            errors.append(
                f"adapter.kind=qlora quantises in blocks of {NF4_BLOCK_SIZE}: model.{field}="
                f"{widths[field]} must be a multiple of {NF4_BLOCK_SIZE}, or leave the "
                f"projections it sizes ({', '.join(_sized(field, cfg))}) out of "
                "adapter.target_modules"
            )
        elif field in split and widths[field] % (NF4_BLOCK_SIZE * par.tp):
            errors.append(
                f"adapter.kind=qlora quantises each tensor-parallel shard in blocks of "
                f"{NF4_BLOCK_SIZE}: model.{field}={widths[field]} split over parallel.tp="
                f"{par.tp} leaves rows {widths[field] / par.tp:g} wide on each rank, not a "
                f"multiple of {NF4_BLOCK_SIZE}; make model.{field} a multiple of "
                f"{NF4_BLOCK_SIZE * par.tp} or lower parallel.tp, or leave the projections it "
                f"splits ({', '.join(split[field])}) out of adapter.target_modules"
            )
    return errors


# The model fields that set each projection's input and output widths.
_KV_WIDTH = "num_kv_heads * head_dim"
_SIZED_BY: Dict[str, Tuple[str, ...]] = {
    "q_proj": ("hidden_size",), "o_proj": ("hidden_size",),
    "k_proj": ("hidden_size", _KV_WIDTH), "v_proj": ("hidden_size", _KV_WIDTH),
    "gate_proj": ("hidden_size", "intermediate_size"),
    "up_proj": ("hidden_size", "intermediate_size"),
    "down_proj": ("hidden_size", "intermediate_size"),
}


# Tensor parallelism splits a row-parallel projection's input: each rank's rows of it must hold
# whole NF4 blocks, the same 64 weights as one process's. (A column-parallel projection's shard
# is whole rows, blocks of the unsplit input.)
_SPLIT_INPUT: Dict[str, str] = {"o_proj": "hidden_size", "down_proj": "intermediate_size"}


def _sized(field: str, cfg: LLMScaleConfig) -> List[str]:
    return [module for module in cfg.adapter.target_modules if field in _SIZED_BY[module]]


def _projection_widths(model: ModelConfig) -> Dict[str, int]:
    head_dim = model.hidden_size // model.num_heads
    return {
        "hidden_size": model.hidden_size,
        _KV_WIDTH: (model.num_kv_heads or model.num_heads) * head_dim,
        "intermediate_size": model.intermediate_size,
    }
