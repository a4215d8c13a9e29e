"""Reading DeepSpeed's checkpoint files without running code a tampered file could carry."""

from pathlib import Path

import torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

# What DeepSpeed 0.19's checkpoint files pickle besides tensors and builtin containers (found
# with `torch.serialization.get_unsafe_globals_in_checkpoint` on fp32 and bf16 checkpoints of
# ZeRO 1-3, with and without CPU offload, and their universal conversions). All hold plain
# numbers:
#   LossScaler, DynamicLossScaler: the loss-scale state (the dynamic one under fp16)
#   ZeroStageEnum: the ZeRO stage, an IntEnum
#   fragment_address: (numel, start) of a parameter's slice of a flat partition, a dataclass
DEEPSPEED_SAFE_GLOBALS = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_deepspeed_file(path: Path):
    """One DeepSpeed checkpoint file, through torch's weights-only unpickler."""
    with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True)
