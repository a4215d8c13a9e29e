"""NF4 storage of frozen weights for QLoRA (Dettmers et al. 2023), through torchao's NF4 tensor:
4-bit NormalFloat codes in blocks of 64 weights, each block's absmax scale quantised again to
int8 in blocks of 256 scales (double quantisation). `F.linear` on an NF4 tensor dequantises it
to the input's dtype for the one product, forward and backward. torchao is the `qlora` extra,
imported on first use."""

import logging
import math

import torch

from llmscale.config.schema import NF4_BLOCK_SIZE as BLOCK_SIZE

SCALER_BLOCK_SIZE = 256
# Stored per weight: a 4-bit code, an int8 scale per block, an fp32 factor per block of scales.
BYTES_PER_WEIGHT = 0.5 + 1 / BLOCK_SIZE + 4 / (BLOCK_SIZE * SCALER_BLOCK_SIZE)

def _nf4_module():
    # torchao's import tries its CUDA kernels and warns on a CPU build; NF4 needs none of them.
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
    except ImportError as error:
        raise ImportError(
            "adapter.kind=qlora needs torchao: pip install 'llmscale[qlora]'") from error
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
    return nf4_tensor


def quantize(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [out, in] in NF4, dequantising to its dtype. A weight whose count of blocks 256
    does not divide (SmolLM2's k_proj: 1,728 blocks) groups its scales in the largest power of
    two that does (64 at least, as `adapter_rules` keeps both dimensions multiples of 64)."""
    blocks = weight.numel() // BLOCK_SIZE
    return _nf4_module().to_nf4(weight.detach().contiguous(), BLOCK_SIZE,
                                math.gcd(blocks, SCALER_BLOCK_SIZE))


def is_quantized(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, _nf4_module().NF4Tensor)


def dequantize(weight: torch.Tensor) -> torch.Tensor:
    return weight.get_original_weight()


class FrozenNF4Weight:
    """The NF4 frozen weight of a QLoRA layer, mixed into the layer (before its LoRA class):
    one rank's whole projection (`QLoRALinear`) or its tensor-parallel shard
    (`ColumnParallelQLoRA`, `RowParallelQLoRA`), quantised where it is held, from its own values.
    A buffer kept out of the state dict: checkpoints hold no copy of it, and a start or a resume
    quantises it again from the base weights. `shard_dim`: the dimension tensor parallelism
    splits, None for a whole weight."""

    shard_dim = None

    def freeze(self, weight: torch.Tensor) -> None:
        """Hold `weight` in NF4; on the meta device it stays a placeholder until
        `quantize_base` gets its values."""
        self._parameters.pop("weight", None)  # a megatron layer's own, unused, allocation
        stored = weight.detach() if weight.is_meta else quantize(weight)
        self.register_buffer("weight", stored, persistent=False)

    def quantize_base(self, weight: torch.Tensor) -> None:
        self.weight = quantize(weight)

    def _apply(self, fn, recurse=True):
        """Moves keep the weight in NF4; a cast (the engine's `.bfloat16()`, which would
        otherwise leave it dequantised) quantises it again in the new dtype."""
        weight = self._buffers["weight"]
        if weight.is_meta or not is_quantized(weight):
            return super()._apply(fn, recurse)
        del self._buffers["weight"]
        super()._apply(fn, recurse)
        moved = fn(torch.empty(0, dtype=weight.dtype, device=weight.device))
        if moved.dtype == weight.dtype:
            self._buffers["weight"] = weight.to(moved.device)
        else:
            self._buffers["weight"] = quantize(dequantize(weight).to(moved.device, moved.dtype))
        return self


def as_held(weight: torch.Tensor, shards: int = 1, dim: int = 0) -> torch.Tensor:
    """The values a QLoRA layer computes with for the frozen `weight`: quantised as its ranks
    held it (each of `shards` tensor-parallel shards along `dim` alone), then dequantised."""
    return torch.cat([dequantize(quantize(shard)) for shard in weight.chunk(shards, dim=dim)],
                     dim=dim)
