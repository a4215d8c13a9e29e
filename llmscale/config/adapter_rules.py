"""The rules of the `adapter` settings, for `validate`."""

from typing import List

from llmscale.config.schema import LLAMA_PROJECTIONS, AdapterKind, LLMScaleConfig


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
    if par.zero_stage == 3:
        errors.append(
            "adapter.kind=lora is supported at parallel.zero_stage 0, 1 or 2: ZeRO-3 would "
            "partition the frozen base too, which this build does not handle; use 1 or 2"
        )
    if cfg.model.num_experts:
        errors.append(
            f"adapter.kind=lora wraps dense projections; an MoE model (model.num_experts="
            f"{cfg.model.num_experts}) is not supported: pick a dense model"
        )
    return errors
