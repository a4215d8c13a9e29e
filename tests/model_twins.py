"""Two copies of one model, a path switched on in one of them: the same step on both, compared
loss by loss and gradient by gradient."""

import pytest
import torch

from llmscale.config.schema import ModelConfig
from llmscale.models import Llama
from llmscale.models.fused_loss import IGNORE_INDEX


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).norm() / reference.norm()).item()


def twin_models(cfg: ModelConfig):
    torch.manual_seed(0)
    reference = Llama(cfg)
    other = Llama(cfg)
    other.load_state_dict(reference.state_dict())
    return reference, other


def shifted_batch(cfg: ModelConfig, seed: int = 0):
    """Inputs [2, 16] and next-token labels, the last position ignored."""
    inputs = torch.randint(0, cfg.vocab_size, (2, 16),
                           generator=torch.Generator().manual_seed(seed))
    labels = torch.roll(inputs, -1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    return inputs, labels


def assert_same_step(reference: Llama, other: Llama, inputs, labels, tolerance: float) -> None:
    """One forward and backward on each: losses and every gradient within `tolerance`."""
    for model in (reference, other):
        model.zero_grad()
    reference_loss, other_loss = reference(inputs, labels), other(inputs, labels)
    reference_loss.backward()
    other_loss.backward()
    assert other_loss.item() == pytest.approx(reference_loss.item(), rel=tolerance)
    other_params = dict(other.named_parameters())
    for name, param in reference.named_parameters():
        assert relative_error(other_params[name].grad, param.grad) < tolerance, name
