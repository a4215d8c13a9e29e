"""QLoRA's layer: LoRA on the NF4-dequantised weight, only the adapters train, the NF4 weight
stays out of the state dict and in NF4 through casts, and its rounding error is NF4's."""

import torch
from torch import nn

from llmscale.adapters import nf4
from llmscale.adapters.lora import LoRALinear, QLoRALinear, apply_lora, describe_trainable
from llmscale.config.schema import AdapterConfig, AdapterKind, ModelConfig
from llmscale.config.validate import ParallelPlan
from llmscale.models import Llama
from llmscale.parallel.parallelize import parallelize

# Every projection's dimensions are whole NF4 blocks of 64.
CFG = ModelConfig(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_size=256, vocab_size=128, max_seq_len=32)
QLORA = AdapterConfig(kind=AdapterKind.qlora, rank=4, alpha=8.0)
IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def llama(seed: int = 0, device: str = "cpu") -> Llama:
    torch.manual_seed(seed)
    with torch.device(device):
        return Llama(CFG)


def trained_looking(layer: LoRALinear) -> LoRALinear:
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    return layer


def test_qlora_layer_is_lora_on_the_dequantised_weight():
    torch.manual_seed(0)
    base = nn.Linear(128, 192, bias=False)
    quantized = trained_looking(QLoRALinear(base, rank=4, alpha=8.0, dropout=0.0))
    rounded = nn.Linear(128, 192, bias=False)
    rounded.weight.data = nf4.dequantize(quantized.weight)
    reference = LoRALinear(rounded, rank=4, alpha=8.0, dropout=0.0)
    reference.load_state_dict(quantized.state_dict(), strict=False)
    x = torch.randn(3, 5, 128)
    assert (quantized(x) - reference(x)).abs().max() < 1e-6
    assert not torch.equal(nf4.dequantize(quantized.weight), base.weight)  # it is rounded


def test_nf4_rounding_error_is_bounded_by_the_block_scale():
    """Each weight lands on the nearest of 16 NF4 levels of its block's absmax: at most half
    the widest gap, (1 - 0.723) / 2 = 0.139 of the scale, away, plus the int8-rounded scale's
    error (0.152 measured)."""
    weight = torch.randn(256, 128, generator=torch.Generator().manual_seed(1)) * 0.02
    error = (nf4.dequantize(nf4.quantize(weight)) - weight).view(-1, 64)
    absmax = weight.view(-1, 64).abs().amax(dim=1, keepdim=True)
    assert (error.abs() / absmax).max() < 0.16
    assert error.pow(2).mean().sqrt() / weight.pow(2).mean().sqrt() < 0.12


def test_only_adapters_train_and_the_nf4_base_is_never_saved():
    model = llama()
    apply_lora(model, QLORA)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, QLoRALinear) and nf4.is_quantized(q_proj.weight)
    state = model.state_dict()
    assert "model.layers.0.self_attn.q_proj.weight" not in state
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in state
    assert describe_trainable(model).startswith("QLoRA (NF4 base) on 14 projections: ")
    model(IDS, labels=IDS).backward()
    trained = {name for name, p in model.named_parameters() if p.grad is not None}
    assert trained == {name for name, p in model.named_parameters() if p.requires_grad}
    assert len(trained) == 28 and all("lora_" in name for name in trained)


def test_the_meta_device_path_quantises_the_seeded_base():
    """Built on the meta device, each base is drawn by its name and quantised: the same NF4
    weights, and the same logits, as quantising the eagerly built model."""
    eager = llama(seed=3)
    apply_lora(eager, QLORA)
    plan = ParallelPlan(world_size=1, dp=1, tp=1, pp=1, zero_stage=0, micro_batch_size=1,
                        grad_accum_steps=1, global_batch_size=1)
    meta = parallelize(llama(seed=3, device="meta"), plan, QLORA)
    for (name, expected), (_, actual) in zip(eager.named_buffers(), meta.named_buffers()):
        if name.endswith("proj.weight"):
            assert torch.equal(nf4.dequantize(expected), nf4.dequantize(actual)), name
    assert torch.equal(eager(IDS), meta(IDS))


def test_a_cast_keeps_the_base_in_nf4_in_the_model_dtype():
    """DeepSpeed's bf16 engine casts the module: the base is quantised again in bf16, not left
    dequantised."""
    model = llama()
    apply_lora(model, QLORA)
    dtype = torch.bfloat16
    model.to(dtype)
    layer = model.model.layers[1].mlp.down_proj
    assert nf4.is_quantized(layer.weight) and layer.weight.dtype == dtype
    assert layer.lora_A.weight.dtype == dtype
    assert model(IDS).dtype == dtype
