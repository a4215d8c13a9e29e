"""The frozen base of an adapter run (LoRA, QLoRA) is never saved with its checkpoints.

It is what the run started from: the weights folder `train.init_from` names, or the seeded
initialisation. A start, a resume and an export each make it again from there, so a checkpoint
holds only what training changes: the adapters, their optimizer state, the RNG states, the data
position and the config (whose `train.init_from` and `train.seed` name the base), and the
base's fingerprint (`base_fingerprint`), which a resume checks against the base it made again.
"""

import hashlib
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, Optional

import torch
from torch import nn

from llmscale.checkpoint.hf import MODEL_YAML, initial_weights
from llmscale.config.load import REPO_ROOT, ConfigError
from llmscale.config.schema import ModelConfig, TrainConfig
from llmscale.models import Llama


def initial_weights_dir(init_from: Optional[str],
                        checkpoint: Optional[Path] = None) -> Optional[Path]:
    """The weights folder `train.init_from` names (relative to the checkout), or None for a
    seeded start. `checkpoint`: the adapter checkpoint whose frozen base the folder is."""
    if not init_from:
        return None
    weights_dir = REPO_ROOT / init_from
    if (weights_dir / MODEL_YAML).is_file():
        return weights_dir
    if checkpoint is None:
        raise ConfigError(
            f"train.init_from={init_from} is not a weights folder (it has no {MODEL_YAML}): "
            "create one with `python tools/convert_checkpoint.py from-hf HF_DIR OUT`")
    raise ConfigError(
        f"checkpoint {checkpoint} holds an adapter run's adapters, not its frozen base, which is "
        f"the weights folder the run started from (train.init_from={init_from}): {weights_dir} "
        f"has no {MODEL_YAML}, it was moved or deleted. Put the folder back there (a link will "
        "do); a resume may instead name its new place with train.init_from")


def base_weights(model: ModelConfig, train: TrainConfig,
                 checkpoint: Path) -> Dict[str, torch.Tensor]:
    """The frozen base an adapter checkpoint was trained on, from where its run got it (`model`
    and `train`: the settings saved beside it)."""
    weights_dir = initial_weights_dir(train.init_from, checkpoint)
    return initial_weights(model, weights_dir) if weights_dir else seeded_weights(model,
                                                                                  train.seed)


def base_fingerprint(train: TrainConfig, weights_dir: Optional[Path]) -> str:
    """What identifies the frozen base: the SHA-256 of the weights folder's safetensors files
    (its content: the folder may move), or the seed it is drawn from. Reads the files once."""
    if weights_dir is None:
        return f"seed {train.seed}"
    digest = hashlib.sha256()
    for path in sorted(Path(weights_dir).glob("*.safetensors")):
        with path.open("rb") as file:
            for chunk in iter(lambda: file.read(1 << 24), b""):
                digest.update(chunk)
    return f"sha256 {digest.hexdigest()}"


def seeded_weights(cfg: ModelConfig, seed: int) -> Dict[str, torch.Tensor]:
    """The initial weights of a run with `train.seed=seed` and no `train.init_from`: the trainer
    seeds the global generator and then builds the model, whose parameters follow from its first
    draw (`Llama.init_seed`). Built on the meta device, each drawn once; the global generator is
    left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device("meta"):
            model = Llama(cfg)
    values = {id(param): model.initial_value(name, param.shape)
              for name, param in model.named_parameters()}
    # The state dict's names, a tied head's included (it is the embedding's parameter).
    return {name: values[id(param)] for name, param in model.state_dict(keep_vars=True).items()}


def has_frozen_parameters(module: nn.Module) -> bool:
    return any(not param.requires_grad for param in module.parameters())


@contextmanager
def frozen_parameters_left_out(module: nn.Module) -> Iterator[None]:
    """While open, `module.state_dict()` leaves out every frozen parameter under each of its
    names. DeepSpeed's `exclude_frozen_parameters` leaves a parameter out by its first name
    only: a head tied to the frozen embedding would keep a whole copy of it as `lm_head.weight`.
    (A pipeline saves each stage's own state dict, with DeepSpeed's exclusion alone: its stages
    cannot share a tied pair.)"""
    frozen = [name for name, param in module.named_parameters(remove_duplicate=False)
              if not param.requires_grad]

    def leave_out(module, state_dict, prefix, local_metadata) -> None:
        for name in frozen:
            state_dict.pop(prefix + name, None)

    handle = module.register_state_dict_post_hook(leave_out)
    try:
        yield
    finally:
        handle.remove()
