"""The fast paths a plan switches on, against the plain ones on a CPU: compiled layers and loss
(losses and gradients within 1e-5) and the fused AdamW (weights within 1e-6 after several
steps)."""

from dataclasses import replace

import pytest
import torch

from llmscale.config import load_config, validate
from llmscale.config.schema import ModelConfig
from llmscale.optim.optimizer import build_optimizer
from llmscale.parallel.compile import apply_compile
from model_twins import assert_same_step, relative_error, shifted_batch, twin_models

TINY = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=176,
                   vocab_size=256, max_seq_len=32)


@pytest.mark.slow  # a cold compile takes a minute or two on a CPU
@pytest.mark.parametrize("fused_loss", [False, True])
def test_compiled_model_gives_the_eager_losses_and_gradients(fused_loss):
    cfg = replace(TINY, num_kv_heads=2)
    eager, compiled = twin_models(cfg)
    if fused_loss:
        eager.use_fused_loss()
        compiled.use_fused_loss()
    apply_compile(compiled)
    assert all(layer._compiled_call_impl is not None for layer in compiled.model.layers)
    for step in range(2):  # the second call runs the cached graphs
        assert_same_step(eager, compiled, *shifted_batch(cfg, step), tolerance=1e-5)


def test_fused_adamw_trains_the_same_weights():
    cfg = load_config(["+exp=tiny"])
    plain_plan = validate(cfg, 1)
    fused_plan = replace(plain_plan, fused_optimizer=True)
    plain, fused = twin_models(TINY)
    initial = {name: param.detach().clone() for name, param in plain.named_parameters()}
    optimizers = [build_optimizer(plain, cfg, plain_plan), build_optimizer(fused, cfg, fused_plan)]
    assert [group["fused"] for group in optimizers[1].param_groups] == [True, True]
    assert not any(group["fused"] for group in optimizers[0].param_groups)
    for step in range(5):
        inputs, labels = shifted_batch(TINY, step)
        for model, optimizer in zip((plain, fused), optimizers):
            model(inputs, labels).backward()
            optimizer.step()
            optimizer.zero_grad()
    fused_params = dict(fused.named_parameters())
    for name, param in plain.named_parameters():
        assert relative_error(fused_params[name].detach(), param.detach()) < 1e-6, name
        assert not torch.equal(param, initial[name])  # they did train
