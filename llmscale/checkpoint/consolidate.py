"""Full fp32 model weights from a saved step folder, whatever ZeRO stage and rank count saved it.

ZeRO 1-3 keep the fp32 master weights flattened and split across the ranks' optimizer files;
DeepSpeed's `zero_to_fp32` knows their padding and alignment rules and is used as is. It loads
every file with `torch.load(weights_only=False)`, which would run any code a tampered file
carries, so here those loads are forced to the weights-only unpickler (`safe_load`).
ZeRO 0 keeps whole parameters in `mp_rank_00_model_states.pt` (under bf16, with unnamed fp32
master copies beside them), which loads without any extra class.
An adapter run's checkpoint holds the adapters alone; a LoRA run's frozen base is made again
from where the run got it (llmscale/checkpoint/frozen_base.py).
"""

import contextlib
import io
import json
from pathlib import Path
from typing import Dict, List

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llmscale.adapters import nf4
from llmscale.checkpoint.checkpointer import STATE_FILE
from llmscale.checkpoint.frozen_base import base_weights
from llmscale.checkpoint.reshard import (
    convert_to_universal, universal_parameter_dirs, universal_tensor,
)
from llmscale.checkpoint.safe_load import weights_only_loads
from llmscale.config.schema import AdapterConfig, AdapterKind, ModelConfig, TrainConfig
from llmscale.parallel.adapter_memory import COLUMN_PARALLEL

ZERO0_MODEL_FILE = "mp_rank_00_model_states.pt"
TIED_HEAD, TIED_EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"


def consolidated_state_dict(step_dir: Path) -> Dict[str, torch.Tensor]:
    """Every parameter of the saved model, unsharded, fp32, named as in `Llama.state_dict()`
    (a tied head appears under both of its names, as one tensor): of a LoRA run, its adapters
    and its frozen base; of a QLoRA run, the adapters alone (its base was NF4-rounded)."""
    weights = saved_state_dict(step_dir)
    if saved_settings(step_dir, "adapter", AdapterConfig, required=False).kind is AdapterKind.lora:
        train = saved_settings(step_dir, "train", TrainConfig, required=False)
        base = base_weights(model_config_of(step_dir), train, step_dir)
        weights = {**_standalone_fp32(base), **weights}
    return weights


def nf4_rounded_base(step_dir: Path) -> Dict[str, torch.Tensor]:
    """The frozen base of a QLoRA checkpoint as its layers computed with it: made again from
    where the run got it, each target projection quantised to NF4 as the run's ranks held it
    (each tensor-parallel shard alone) and dequantised. With the adapters merged into it, the
    model the run trained (what evaluation scores); not an export: no checkpoint holds it."""
    adapter = saved_settings(step_dir, "adapter", AdapterConfig, required=False)
    train = saved_settings(step_dir, "train", TrainConfig, required=False)
    tp = _saved_plan(step_dir).get("tp", 1)
    base = _standalone_fp32(base_weights(model_config_of(step_dir), train, step_dir))
    for name in list(base):
        projection = name.split(".")[-2]
        if projection in adapter.target_modules:
            base[name] = nf4.as_held(base[name], tp, 0 if projection in COLUMN_PARALLEL else 1)
    return base


def saved_state_dict(step_dir: Path) -> Dict[str, torch.Tensor]:
    """The parameters the checkpoint holds, unsharded, fp32: every one of a full run, the
    adapters of an adapter run."""
    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        raise FileNotFoundError(f"{step_dir}: no such checkpoint folder")
    plan = _saved_plan(step_dir)
    if plan.get("tp", 1) > 1 or plan.get("pp", 1) > 1:
        weights = _from_model_parallel(step_dir, plan)
    elif any(step_dir.glob("*_optim_states.pt")):
        weights = _from_zero_partitions(step_dir)
    elif (step_dir / ZERO0_MODEL_FILE).is_file():
        weights = _from_zero0_model_states(step_dir / ZERO0_MODEL_FILE)
    else:
        raise ValueError(
            f"{step_dir} holds no DeepSpeed model states ({ZERO0_MODEL_FILE} or "
            "*_optim_states.pt): it is not a checkpoint step folder"
        )
    return _standalone_fp32(weights)


def model_config_of(step_dir: Path) -> ModelConfig:
    """The model settings the checkpoint was trained with, from the config.yaml saved beside it."""
    return saved_settings(step_dir, "model", ModelConfig)


def saved_settings(step_dir: Path, section: str, schema: type, required: bool = True):
    """One section of the config.yaml saved beside a checkpoint, as its schema's dataclass; an
    optional section the file lacks (saved before the setting existed) gives the defaults."""
    path = Path(step_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: cannot tell what {step_dir} holds")
    saved = OmegaConf.load(path)
    if section not in saved and required:
        raise ValueError(f"{path} has no {section} section")
    try:
        return OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(schema), saved.get(section, {})))
    except OmegaConfBaseException as error:
        raise ValueError(f"{path}: its {section} section does not fit llmscale's schema: "
                         f"{error}") from None


def _saved_plan(step_dir: Path) -> dict:
    state_file = step_dir / STATE_FILE
    return json.loads(state_file.read_text()).get("plan", {}) if state_file.is_file() else {}


def _from_model_parallel(step_dir: Path, plan: dict) -> Dict[str, torch.Tensor]:
    """Tensor shards and pipeline stages merged by DeepSpeed's universal conversion (cached in
    the step folder, as a resume on another layout does)."""
    if plan["zero_stage"] == 0:
        raise ValueError(
            f"{step_dir} was saved with tp={plan['tp']}, pp={plan['pp']} at ZeRO-0, whose "
            "optimizer files DeepSpeed's universal conversion cannot read; consolidating it is "
            "not supported. Train with parallel.zero_stage=1 to export tensor- or "
            "pipeline-parallel runs"
        )
    convert_to_universal(step_dir)
    weights = {name: universal_tensor(folder / "fp32.pt")
               for name, folder in universal_parameter_dirs(step_dir, plan["pp"]).items()}
    if TIED_EMBEDDING in weights and model_config_of(step_dir).tie_embeddings:
        weights[TIED_HEAD] = weights[TIED_EMBEDDING]
    return weights


def _from_zero_partitions(step_dir: Path) -> Dict[str, torch.Tensor]:
    # zero_to_fp32 prints progress lines meant for its own command-line script.
    with weights_only_loads(step_dir), contextlib.redirect_stdout(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)


def _from_zero0_model_states(path: Path) -> Dict[str, torch.Tensor]:
    saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    weights = dict(saved["module"])
    masters = (saved.get("optimizer") or {}).get("fp32_groups")
    if masters:
        _replace_with_fp32_masters(weights, masters, path)
    return weights


def _replace_with_fp32_masters(weights: Dict[str, torch.Tensor],
                               masters: List[List[torch.Tensor]], path: Path) -> None:
    """Under bf16, ZeRO 0 saves the bf16 working weights by name and their fp32 master copies
    by optimizer group, without names. Each master copy is matched to the next unclaimed
    parameter of its shape that it rounds to: groups keep model order, so a tie (two parameters
    with the same rounded values, such as untrained norms) picks the right one."""
    aliases = _aliases_by_storage(weights)
    unclaimed = list(aliases)
    for master in (tensor for group in masters for tensor in group):
        name = next((
            name for name in unclaimed
            if weights[name].shape == master.shape
            and torch.equal(master.to(weights[name].dtype), weights[name])
        ), None)
        if name is None:
            raise ValueError(
                f"{path}: an fp32 master weight of shape {tuple(master.shape)} matches no saved "
                "parameter; the file is damaged or from an unsupported DeepSpeed version"
            )
        unclaimed.remove(name)
        for alias in aliases[name]:
            weights[alias] = master
    if unclaimed:
        raise ValueError(f"{path}: no fp32 master weight for {', '.join(unclaimed)}")


def _aliases_by_storage(weights: Dict[str, torch.Tensor]) -> Dict[str, List[str]]:
    """First name of each distinct tensor -> all its names (a tied head shares the embedding)."""
    first_name: Dict[tuple, str] = {}
    aliases: Dict[str, List[str]] = {}
    for name, tensor in weights.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        owner = first_name.setdefault(key, name)
        aliases.setdefault(owner, []).append(name)
    return aliases


def _standalone_fp32(weights: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """fp32 copies that own their memory: DeepSpeed returns views of flat buffers or of the
    memory-mapped file, which safetensors refuses to save and which pin the whole buffer."""
    result = {}
    for owner, names in _aliases_by_storage(weights).items():
        copy = weights[owner].detach().to(torch.float32, copy=True).contiguous()
        result.update((name, copy) for name in names)
    return {name: result[name] for name in weights}
