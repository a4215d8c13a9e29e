"""A LoRA run's adapters out as a PEFT folder (`adapter_config.json` +
`adapter_model.safetensors`) that `peft.PeftModel.from_pretrained` loads onto the HF export of
its base; or, merged into the base weights, as a plain HF folder (`export_hf`)."""

import json
from pathlib import Path
from typing import Dict, Optional

import torch
from safetensors.torch import save_file

from llmscale.adapters.lora import is_adapter, merge_adapters, peft_names
from llmscale.checkpoint.consolidate import saved_settings
from llmscale.config.schema import AdapterConfig, AdapterKind

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def adapter_config_of(step_dir: Path) -> AdapterConfig:
    """The adapter settings a checkpoint was trained with; an error unless it trained LoRA or
    QLoRA."""
    cfg = saved_settings(step_dir, "adapter", AdapterConfig, required=False)
    if cfg.kind is AdapterKind.none:
        raise ValueError(f"{step_dir} was trained without adapters (adapter.kind="
                         f"{cfg.kind.value}): export it with to-hf alone")
    return cfg


def check_hf_export(step_dir: Path, merge: bool) -> None:
    """A QLoRA checkpoint has no base weights to export: they are the run's `train.init_from`
    (its NF4 copy is never saved), and the adapters were fitted to the NF4-rounded base, so
    folding them into either the original weights or the rounded ones gives another model."""
    cfg = saved_settings(step_dir, "adapter", AdapterConfig, required=False)
    if cfg.kind is not AdapterKind.qlora:
        return
    if merge:
        raise ValueError(
            f"{step_dir} trained QLoRA adapters against an NF4-rounded base: merged into the "
            "original weights they compute another model, and the rounded weights are no "
            "checkpoint's; export the adapters with to-peft and load them on the base"
        )
    raise ValueError(
        f"{step_dir} is a QLoRA run's: it holds the adapters, not the frozen base, which is the "
        "run's train.init_from folder; export the adapters with to-peft"
    )


def without_adapters(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The base model's weights of a LoRA run, as `Llama` names them."""
    return {name: tensor for name, tensor in state_dict.items() if not is_adapter(name)}


def merged(state_dict: Dict[str, torch.Tensor], step_dir: Path) -> Dict[str, torch.Tensor]:
    """The base weights with the checkpoint's adapters folded in."""
    return merge_adapters(state_dict, adapter_config_of(step_dir))


def peft_config(cfg: AdapterConfig, base_model: Optional[str] = None) -> dict:
    """adapter_config.json of PEFT's LoraConfig: the settings that change what the adapters
    compute, the rest at PEFT's defaults."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted(cfg.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }


def export_peft(state_dict: Dict[str, torch.Tensor], cfg: AdapterConfig, out_dir: Path,
                base_model: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> Path:
    adapters = peft_names(state_dict)
    if not adapters:
        raise ValueError("the state dict holds no LoRA adapters (no *.lora_A.weight)")
    if dtype is not None:
        adapters = {name: tensor.to(dtype) for name, tensor in adapters.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in adapters.items()},
              out_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    config = peft_config(cfg, base_model)
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir
