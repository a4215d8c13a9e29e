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
    """What QLoRA adds: torchao, one whole NF4 weight per rank, dimensions in whole blocks."""
    par, errors = cfg.parallel, []
    if importlib.util.find_spec("torchao") is None:
        errors.append("adapter.kind=qlora stores the base in NF4 with torchao: "
                      "pip install 'llmscale[qlora]'")
    if par.tp > 1 or par.pp > 1:
        errors.append(
            f"adapter.kind=qlora quantises whole projections on one rank: set parallel.tp=1 and "
            f"parallel.pp=1 (not {par.tp} / {par.pp}), or use adapter=lora"
        )
    widths = _projection_widths(cfg.model)
    sized = {field for module in cfg.adapter.target_modules for field in _SIZED_BY.get(module, ())}
    for field in sorted(sized):
        if widths[field] % NF4_BLOCK_SIZE:
            errors.append(
                f"adapter.kind=qlora quantises in blocks of {NF4_BLOCK_SIZE}: model.{field}="
                f"{widths[field]} must be a multiple of {NF4_BLOCK_SIZE}, or leave the "
                f"projections it sizes ({', '.join(_sized(field, cfg))}) out of "
                "adapter.target_modules"
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


def _sized(field: str, cfg: LLMScaleConfig) -> List[str]:
    return [module for module in cfg.adapter.target_modules if field in _SIZED_BY[module]]


def _projection_widths(model: ModelConfig) -> Dict[str, int]:
    head_dim = model.hidden_size // model.num_heads
    return {
        "hidden_size": model.hidden_size,
        _KV_WIDTH: (model.num_kv_heads or model.num_heads) * head_dim,
        "intermediate_size": model.intermediate_size,
    }
