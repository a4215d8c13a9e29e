"""The fast paths a plan switches on, against the plain ones on a CPU: compiled layers and loss
(losses and gradients within 1e-5) and the fused AdamW (weights within 1e-6 after several
steps)."""

from dataclasses import replace

import pytest
import torch

from llmscale.config import load_config, validate
from llmscale.config.schema import ModelConfig
from llmscale.models import Llama
from llmscale.models.fused_loss import IGNORE_INDEX
from llmscale.optim.optimizer import build_optimizer
from llmscale.parallel.compile import apply_compile

TINY = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=176,
                   vocab_size=256, max_seq_len=32)


def _relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).norm() / reference.norm()).item()


def _twin_models(cfg):
    torch.manual_seed(0)
    plain = Llama(cfg)
    other = Llama(cfg)
    other.load_state_dict(plain.state_dict())
    return plain, other


def _batch(cfg, seed=0):
    inputs = torch.randint(0, cfg.vocab_size, (2, 16),
                           generator=torch.Generator().manual_seed(seed))
    labels = torch.roll(inputs, -1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    return inputs, labels


@pytest.mark.slow  # a cold compile takes a minute or two on a CPU
@pytest.mark.parametrize("fused_loss", [False, True])
def test_compiled_model_gives_the_eager_losses_and_gradients(fused_loss):
    cfg = replace(TINY, num_kv_heads=2)
    eager, compiled = _twin_models(cfg)
    if fused_loss:
        eager.use_fused_loss()
        compiled.use_fused_loss()
    apply_compile(compiled)
    assert all(layer._compiled_call_impl is not None for layer in compiled.model.layers)
    for step in range(2):  # the second call runs the cached graphs
        eager.zero_grad()
        compiled.zero_grad()
        inputs, labels = _batch(cfg, step)
        eager_loss, compiled_loss = eager(inputs, labels), compiled(inputs, labels)
        eager_loss.backward()
        compiled_loss.backward()
        assert compiled_loss.item() == pytest.approx(eager_loss.item(), rel=1e-5)
        compiled_params = dict(compiled.named_parameters())
        for name, param in eager.named_parameters():
            assert _relative_error(compiled_params[name].grad, param.grad) < 1e-5, name


def test_fused_adamw_trains_the_same_weights():
    cfg = load_config(["+exp=tiny"])
    plain_plan = validate(cfg, 1)
    fused_plan = replace(plain_plan, fused_optimizer=True)
    plain, fused = _twin_models(TINY)
    initial = {name: param.detach().clone() for name, param in plain.named_parameters()}
    optimizers = [build_optimizer(plain, cfg, plain_plan), build_optimizer(fused, cfg, fused_plan)]
    assert [group["fused"] for group in optimizers[1].param_groups] == [True, True]
    assert not any(group["fused"] for group in optimizers[0].param_groups)
    for step in range(5):
        inputs, labels = _batch(TINY, step)
        for model, optimizer in zip((plain, fused), optimizers):
            model(inputs, labels).backward()
            optimizer.step()
            optimizer.zero_grad()
    fused_params = dict(fused.named_parameters())
    for name, param in plain.named_parameters():
        assert _relative_error(fused_params[name].detach(), param.detach()) < 1e-6, name
        assert not torch.equal(param, initial[name])  # they did train
