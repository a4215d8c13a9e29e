"""Reading checkpoint files without running code a tampered file could carry.

DeepSpeed loads its engine, optimizer, expert and pipeline-layer files, and converts them to
universal checkpoints, with `torch.load(weights_only=False)`, which unpickles any object a file
names. `weights_only_loads` forces every `torch.load` inside it to torch's weights-only
unpickler, which accepts tensors, containers and the few DeepSpeed classes listed below, and
turns a refusal into one message naming the file and what it holds."""

import contextlib
import os
import pickle
from pathlib import Path
from typing import Dict, Iterator, List

import torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from llmscale.config.load import ConfigError

# What DeepSpeed 0.19's checkpoint files pickle besides tensors and builtin containers (found
# with `torch.serialization.get_unsafe_globals_in_checkpoint` on fp32 and bf16 checkpoints of
# ZeRO 0-3, with and without CPU offload, of tensor, pipeline and expert parallel runs, and
# their universal conversions). All hold plain numbers:
#   LossScaler, DynamicLossScaler: the loss-scale state (the dynamic one under fp16)
#   ZeroStageEnum: the ZeRO stage, an IntEnum
#   fragment_address: (numel, start) of a parameter's slice of a flat partition, a dataclass
DEEPSPEED_SAFE_GLOBALS = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
_SAFE_NAMES = {f"{cls.__module__}.{cls.__qualname__}" for cls in DEEPSPEED_SAFE_GLOBALS}
_FORCE, _FORCE_NOT = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def load_deepspeed_file(path: Path):
    """One DeepSpeed checkpoint file, through torch's weights-only unpickler."""
    with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True)


@contextlib.contextmanager
def weights_only_loads(step_dir: Path) -> Iterator[None]:
    """Every `torch.load` inside uses the weights-only unpickler, even where the caller (here
    DeepSpeed) passes `weights_only=False`: torch reads the variable on each call. A file of
    `step_dir` that holds any other object is refused with a ConfigError naming it."""
    saved = {name: os.environ.get(name) for name in (_FORCE, _FORCE_NOT)}
    os.environ[_FORCE] = "1"
    # torch refuses to run with both set; forcing the unsafe path has to give way here.
    os.environ.pop(_FORCE_NOT, None)
    try:
        with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
            yield
    except pickle.UnpicklingError as error:
        raise ConfigError(_refusal(step_dir, error)) from None
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def unsafe_globals(step_dir: Path) -> Dict[str, List[str]]:
    """The files under `step_dir` that name classes or functions outside the allow-list, with
    those names (read from the pickle's opcodes, nothing unpickled)."""
    found = {}
    for path in sorted(step_dir.rglob("*.pt")):
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except (RuntimeError, ValueError, pickle.UnpicklingError):
            continue  # not a zip-format torch file; torch's own message covers it
        unsafe = sorted(set(names) - _SAFE_NAMES)
        if unsafe:
            found[str(path.relative_to(step_dir))] = unsafe
    return found


def _refusal(step_dir: Path, error: pickle.UnpicklingError) -> str:
    found = unsafe_globals(step_dir)
    what = ("; ".join(f"{name} names {', '.join(globals_)}" for name, globals_ in found.items())
            if found else str(error).splitlines()[0])
    return (f"checkpoint {step_dir} was not loaded: {what}. Unpickling such objects could run "
            "code, so llmscale loads only tensors, containers and the DeepSpeed classes in "
            "llmscale/checkpoint/safe_load.py. Resume from a checkpoint you trust (train.resume="
            "PATH picks an older one)")
