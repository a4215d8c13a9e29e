"""LoRA (Hu et al. 2021) applied to a built `Llama` from outside, as parallelism is.

Each target projection `W x` becomes `W x + (alpha / rank) * B A dropout(x)`, with `W` frozen
and `A` [rank, in], `B` [out, rank] trained. The wrapper keeps the frozen weight under its own
name (`...q_proj.weight`) and adds `...q_proj.lora_A.weight` and `...q_proj.lora_B.weight`:
checkpoints, HF exports and the name-seeded initialisation of the base see the names they know,
and the adapters' names are PEFT's once prefixed with `base_model.model.`.

QLoRA (Dettmers et al. 2023) is the same layer with the frozen weight held in NF4
(`QLoRALinear`), a buffer left out of the state dict: checkpoints hold no copy of it, and a
start or a resume quantises it again from the base weights (`train.init_from`, or the seeded
initial values).
"""

import math
from contextlib import contextmanager
from typing import Dict, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from llmscale.adapters import nf4
from llmscale.config.schema import AdapterConfig, AdapterKind

LORA_A, LORA_B = "lora_A.weight", "lora_B.weight"
# What PEFT puts before a module's name in `adapter_model.safetensors`.
PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Module):
    """A bias-free `nn.Linear` whose frozen weight gains a trained low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        if base.bias is not None:
            raise ValueError("LoRALinear wraps bias-free linear layers (Llama's projections)")
        self.freeze(base.weight)
        device = base.weight.device
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=device)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=device)
        self.dropout = nn.Dropout(dropout)
        self.scaling = alpha / rank

    def freeze(self, weight: nn.Parameter) -> None:
        self.weight = weight
        self.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


class QLoRALinear(nf4.FrozenNF4Weight, LoRALinear):
    """LoRALinear whose frozen weight is stored in NF4 (`nf4.FrozenNF4Weight`) and dequantised,
    to the input's dtype, for each product (`F.linear` on an NF4 tensor)."""


LAYERS = {AdapterKind.lora: LoRALinear, AdapterKind.qlora: QLoRALinear}


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """The frozen base alone while inside: every adapter's update (`LoRALinear` and its
    tensor-parallel forms) scaled by 0, which adds exactly 0 to the base's output, its collectives
    still run on every rank; the scalings restored after."""
    layers = [module for module in model.modules() if hasattr(module, "lora_B")]
    scalings = [layer.scaling for layer in layers]
    for layer in layers:
        layer.scaling = 0.0
    try:
        yield
    finally:
        for layer, scaling in zip(layers, scalings):
            layer.scaling = scaling


def is_adapter(name: str) -> bool:
    return name.endswith((LORA_A, LORA_B))


def lora_initial_value(name: str, shape: Sequence[int],
                       generator: torch.Generator) -> torch.Tensor:
    """B starts at zero, so the adapted model computes what the base does; A as PEFT draws it
    (kaiming-uniform with a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in)))."""
    if name.endswith(LORA_B):
        return torch.zeros(shape)
    bound = 1.0 / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def apply_lora(model: nn.Module, cfg: AdapterConfig, quantize: bool = True) -> None:
    """Freeze every weight of `model` (a `Llama`) and wrap its target projections (in
    `QLoRALinear` for `adapter.kind=qlora`). On the meta device the adapters (and QLoRA's
    frozen bases) stay shapes for `parallelize` to fill; otherwise they get their initial values
    here, from `model.initial_value`, the same under any layout. `quantize=False` leaves
    QLoRA's bases in full precision (LoRA layers), for tensor parallelism to split and quantise
    each rank's shard of them."""
    if cfg.kind not in LAYERS:
        return
    layer_class = LAYERS[cfg.kind if quantize else AdapterKind.lora]
    model.requires_grad_(False)
    targets = set(cfg.target_modules)
    wrapped = 0
    for name, module in list(model.named_modules()):
        parent_name, _, attribute = name.rpartition(".")
        if attribute in targets and type(module) is nn.Linear:
            parent = model.get_submodule(parent_name)
            layer = layer_class(module, cfg.rank, cfg.alpha, cfg.dropout)
            setattr(parent, attribute, layer)
            wrapped += 1
    if not wrapped:
        raise ValueError(f"adapter.target_modules={list(cfg.target_modules)} matched no plain "
                         "linear layer of the model")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_adapter(name) and not param.is_meta:
                param.copy_(model.initial_value(name, param.shape))


def quantize_initial_bases(model: nn.Module, tp: int = 1, rank: int = 0) -> None:
    """The frozen NF4 weights of QLoRA layers built on the meta device, from their seeded
    initial values (`model.initial_value`, the base's own name), one at a time; a
    tensor-parallel layer's from its own shard (`rank` of `tp`) of the whole weight's."""
    for name, module in model.named_modules():
        if isinstance(module, nf4.FrozenNF4Weight) and not nf4.is_quantized(module.weight):
            shape, dim = list(module.weight.shape), module.shard_dim
            if dim is not None:
                shape[dim] *= tp
            value = model.initial_value(f"{name}.weight", shape)
            module.quantize_base(value if dim is None else value.chunk(tp, dim)[rank])


def merge_adapters(state_dict: Dict[str, torch.Tensor],
                   cfg: AdapterConfig) -> Dict[str, torch.Tensor]:
    """The base weights with every adapter folded in (W + alpha/rank * B A), adapters dropped."""
    scaling = cfg.alpha / cfg.rank
    merged = {name: tensor for name, tensor in state_dict.items() if not is_adapter(name)}
    for name in state_dict:
        if name.endswith(LORA_A):
            module = name[: -len(LORA_A)]
            down, up = state_dict[name], state_dict[module + LORA_B]
            base = merged[module + "weight"]
            merged[module + "weight"] = base + scaling * (up.to(base.dtype) @ down.to(base.dtype))
    return merged


def peft_names(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The adapters alone, under the names PEFT saves them with."""
    return {PEFT_PREFIX + name: tensor for name, tensor in state_dict.items() if is_adapter(name)}


def describe_trainable(model: nn.Module) -> str:
    # (Under tensor parallelism the wrapped projections are Megatron's, adapted alike.)
    wrapped = sum(hasattr(module, "lora_A") for module in model.modules())
    quantized = [module.weight for module in model.modules()
                 if isinstance(module, nf4.FrozenNF4Weight)]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in [*model.parameters(), *quantized])
    kind = "QLoRA (NF4 base)" if quantized else "LoRA"
    return (f"{kind} on {wrapped} projections: {trainable:,} of {total:,} parameters train "
            f"({100 * trainable / total:.2f}%)")
