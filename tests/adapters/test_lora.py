"""The LoRA layer and its application: the base's outputs at step 0, only adapters train, the
same initial values under any layout, merging, and PEFT's names."""

import pytest
import torch

from llmscale.adapters.lora import (
    LoRALinear, adapters_off, apply_lora, describe_trainable, merge_adapters, peft_names,
)
from llmscale.config.schema import AdapterConfig, AdapterKind, ModelConfig
from llmscale.config.validate import ParallelPlan
from llmscale.models import Llama
from llmscale.parallel.parallelize import parallelize

CFG = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_size=96, vocab_size=128, max_seq_len=32)
LORA = AdapterConfig(kind=AdapterKind.lora, rank=4, alpha=8.0)
IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def llama(seed: int = 0, device: str = "cpu") -> Llama:
    torch.manual_seed(seed)
    with torch.device(device):
        return Llama(CFG)


def test_adapted_model_computes_what_the_base_does_at_step_0():
    model = llama()
    before = model(IDS)
    apply_lora(model, LORA)
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoRALinear)
    assert torch.equal(model(IDS), before)


def test_with_adapters_off_a_trained_model_computes_what_its_base_does():
    """DPO's reference for adapter runs: bit for bit the base, the adapters back on after."""
    model = llama()
    base = model(IDS)
    apply_lora(model, LORA)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B.weight"):
                param.normal_()
    adapted = model(IDS)
    assert not torch.equal(adapted, base)
    with adapters_off(model):
        assert torch.equal(model(IDS), base)
    assert torch.equal(model(IDS), adapted)


def test_only_adapters_train_and_the_base_keeps_its_names():
    model = llama()
    base_names = set(dict(model.named_parameters()))
    apply_lora(model, LORA)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == base_names
    # 7 projections x 2 layers x (A, B)
    assert len(trainable) == 28
    assert "model.layers.1.mlp.down_proj.lora_A.weight" in trainable
    # rank 4 x (in + out) per projection: (128 + 96 + 96 + 128 + 160 + 160 + 160) x 4 x 2 layers
    assert describe_trainable(model).startswith("LoRA on 14 projections: 7,424 of ")
    model(IDS, labels=IDS).backward()
    assert all(p.grad is None for name, p in model.named_parameters() if name in frozen)
    assert all(p.grad is not None for name, p in model.named_parameters() if name in trainable)


def test_target_modules_choose_the_wrapped_projections():
    model = llama()
    apply_lora(model, AdapterConfig(kind=AdapterKind.lora, target_modules=["q_proj", "v_proj"]))
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert isinstance(attention.q_proj, LoRALinear) and isinstance(attention.v_proj, LoRALinear)
    assert not isinstance(attention.k_proj, LoRALinear)
    assert not isinstance(mlp.up_proj, LoRALinear)


def test_initial_adapters_are_the_same_built_on_the_meta_device():
    """Seeded by name: the meta-device path (each rank fills its own share) draws what the
    eager one does."""
    eager = llama(seed=3)
    apply_lora(eager, LORA)
    plan = ParallelPlan(world_size=1, dp=1, tp=1, pp=1, zero_stage=0, micro_batch_size=1,
                        grad_accum_steps=1, global_batch_size=1)
    meta = parallelize(llama(seed=3, device="meta"), plan, LORA)
    assert len(eager.state_dict()) == len(meta.state_dict())
    for (name, expected), (other, actual) in zip(eager.state_dict().items(),
                                                  meta.state_dict().items()):
        assert name == other and torch.equal(expected, actual), name
    down = eager.state_dict()["model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert down.abs().max() > 0 and down.abs().max() <= 1 / 64**0.5
    assert not eager.state_dict()["model.layers.0.self_attn.q_proj.lora_B.weight"].any()


def test_merged_weights_compute_what_the_adapters_do():
    model = llama()
    apply_lora(model, LORA)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B.weight"):
                param.normal_(0, 0.1)
    adapted = model(IDS)
    plain = llama(seed=5)
    plain.load_state_dict(merge_adapters(model.state_dict(), LORA), strict=True)
    assert (plain(IDS) - adapted).abs().max() < 1e-5
    assert (plain(IDS) - llama()(IDS)).abs().max() > 1e-3  # the adapters did change the model


def test_peft_names_hold_the_adapters_only():
    model = llama()
    apply_lora(model, LORA)
    names = peft_names(model.state_dict())
    assert len(names) == 28
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert "base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight" in names


def test_a_target_list_that_matches_nothing_is_refused():
    with pytest.raises(ValueError, match="adapter.target_modules"):
        apply_lora(llama(), AdapterConfig(kind=AdapterKind.lora, target_modules=["lm_head_x"]))
