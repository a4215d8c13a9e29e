from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from llmscale.config.schema import ModelConfig
from llmscale.models import Llama, count_parameters, flops_per_token

TINY = ModelConfig(
    hidden_size=64, num_layers=2, num_heads=4, intermediate_size=176, vocab_size=256, max_seq_len=32
)
VARIANTS = {
    "mha": TINY,
    "gqa": replace(TINY, num_kv_heads=2),
    "tied": replace(TINY, tie_embeddings=True),
}


def hf_llama(cfg: ModelConfig) -> LlamaForCausalLM:
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
    )
    hf_cfg._attn_implementation = "eager"
    return LlamaForCausalLM(hf_cfg).eval()


def random_batch(cfg: ModelConfig, batch: int = 2, seq_len: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=generator)


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_match_hf_llama(name: str) -> None:
    cfg = VARIANTS[name]
    torch.manual_seed(0)
    # A non-default theta so a RoPE mismatch cannot hide behind the shared default.
    cfg = replace(cfg, rope_theta=500.0, init_std=0.1)
    ours = Llama(cfg).eval()
    # Randomise the norms too, so a swapped or missing norm weight shows up.
    with torch.no_grad():
        for param_name, param in ours.named_parameters():
            if param_name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    theirs = hf_llama(cfg)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    if cfg.tie_embeddings:
        assert theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()

    input_ids = random_batch(cfg)
    with torch.no_grad():
        expected = theirs(input_ids).logits
        actual = ours(input_ids)
    assert actual.shape == (2, 16, cfg.vocab_size)
    assert (actual - expected).abs().max().item() < 1e-5


def test_state_dict_uses_hf_names() -> None:
    keys = set(Llama(replace(TINY, num_layers=1, tie_embeddings=True)).state_dict())
    layer = "model.layers.0."
    assert keys == {
        "model.embed_tokens.weight",
        *(f"{layer}self_attn.{p}_proj.weight" for p in "qkvo"),
        *(f"{layer}mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
        f"{layer}input_layernorm.weight",
        f"{layer}post_attention_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight",
    }


def test_tied_head_is_the_embedding() -> None:
    model = Llama(replace(TINY, tie_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_meta_device_build_then_init_weights() -> None:
    cfg = replace(TINY, tie_embeddings=True)
    with torch.device("meta"):
        model = Llama(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    reference = Llama(cfg).model.rotary_emb
    assert torch.equal(model.model.rotary_emb.cos, reference.cos)
    assert torch.equal(model.model.rotary_emb.sin, reference.sin)


def test_initial_values_depend_on_the_seed_and_name_only() -> None:
    """What lets every parallel layout start from the same model: a meta-device build whose
    parameters are filled one at a time, in any order, equals the eager build."""
    cfg = replace(TINY, tie_embeddings=False)
    torch.manual_seed(7)
    eager = Llama(cfg)
    torch.manual_seed(7)
    with torch.device("meta"):
        lazy = Llama(cfg)
    for name, param in reversed(list(lazy.named_parameters())):
        assert torch.equal(lazy.initial_value(name, param.shape), eager.state_dict()[name]), name
    torch.manual_seed(8)
    assert not torch.equal(Llama(cfg).lm_head.weight, eager.lm_head.weight)


def test_init_scales_residual_outputs() -> None:
    cfg = replace(TINY, hidden_size=256, intermediate_size=512, num_layers=8, init_std=0.02)
    layer = Llama(cfg).model.layers[0]
    residual_std = 0.02 / (2 * cfg.num_layers) ** 0.5
    assert layer.self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert layer.self_attn.o_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert torch.all(layer.input_layernorm.weight == 1)


def test_loss_is_cross_entropy_of_logits() -> None:
    torch.manual_seed(0)
    model = Llama(TINY)
    input_ids = random_batch(TINY)
    labels = random_batch(TINY).roll(1, dims=1)
    labels[0, :5] = -100
    with torch.no_grad():
        logits = model(input_ids)
        loss = model(input_ids, labels)
    flat_logits = logits.reshape(-1, TINY.vocab_size)
    expected = F.cross_entropy(flat_logits, labels.reshape(-1), ignore_index=-100)
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_bf16_forward_close_to_fp32() -> None:
    torch.manual_seed(0)
    model = Llama(VARIANTS["gqa"])
    input_ids = random_batch(TINY)
    with torch.no_grad():
        loss_fp32 = model(input_ids, input_ids)
        model.to(torch.bfloat16)
        logits = model(input_ids)
        loss_bf16 = model(input_ids, input_ids)
    assert logits.dtype == torch.bfloat16
    assert loss_bf16.dtype == torch.float32
    assert loss_bf16.item() == pytest.approx(loss_fp32.item(), abs=2e-2)


def test_sequence_longer_than_max_seq_len_is_rejected() -> None:
    model = Llama(TINY)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, TINY.max_seq_len + 1, dtype=torch.long))


def test_unresolved_vocab_is_rejected() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        Llama(replace(TINY, vocab_size=None))


def test_training_steps_reduce_loss() -> None:
    torch.manual_seed(0)
    model = Llama(VARIANTS["gqa"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    input_ids = random_batch(TINY)
    labels = input_ids.roll(-1, dims=1)
    losses = []
    for _ in range(10):
        loss = model(input_ids, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("name", VARIANTS)
def test_count_parameters_matches_built_model(name: str) -> None:
    cfg = VARIANTS[name]
    model = Llama(cfg)
    # parameters() yields a tied weight once, which is the count we want.
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())


def test_llama2_7b_parameter_count_matches_hf() -> None:
    llama2_7b = ModelConfig(
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        intermediate_size=11008,
        vocab_size=32000,
        max_seq_len=4096,
    )
    assert count_parameters(llama2_7b) == 6_738_415_616


def test_flops_per_token_by_hand() -> None:
    cfg = VARIANTS["gqa"]  # d=64, L=2, 4 heads of 16, 2 KV heads, I=176, V=256
    seq_len = 128
    attention = 2 * 64 * 64 + 2 * 64 * 32  # q, o + k, v
    mlp = 3 * 64 * 176
    n_matmul = 2 * (attention + mlp) + 64 * 256  # + lm_head
    assert n_matmul == 108_544
    expected = 6 * n_matmul + 12 * 2 * 64 * seq_len
    assert flops_per_token(cfg, seq_len) == expected == 847_872
    # Tying shares storage, not work: the head's matmul still counts.
    assert flops_per_token(replace(cfg, tie_embeddings=True), seq_len) == expected


def test_flops_matmul_term_is_the_models_linear_weights() -> None:
    cfg = VARIANTS["gqa"]
    linears = [m for m in Llama(cfg).modules() if isinstance(m, torch.nn.Linear)]
    linear_weights = sum(m.weight.numel() for m in linears)
    attention_term = 12 * cfg.num_layers * cfg.hidden_size * 8
    assert flops_per_token(cfg, 8) == 6 * linear_weights + attention_term


def test_rope_tables_are_cast_once_and_follow_the_model() -> None:
    rope = Llama(TINY).model.rotary_emb
    cos, sin = rope(16, torch.bfloat16)
    again_cos, _ = rope(8, torch.bfloat16)
    assert cos.dtype == torch.bfloat16
    assert again_cos.data_ptr() == cos.data_ptr()  # the same cast table, not a new cast
    assert torch.equal(cos, rope.cos[:16].to(torch.bfloat16))
    assert torch.equal(sin, rope.sin[:16].to(torch.bfloat16))
    rope.double()  # moving or converting the module drops the casts made from the old tables
    cos64, _ = rope(16, torch.bfloat16)
    assert cos64.data_ptr() != cos.data_ptr()
    assert torch.equal(cos64, rope.cos[:16].to(torch.bfloat16))


@pytest.mark.parametrize("causal", [True, False])
def test_only_an_encoder_lets_a_later_token_change_an_earlier_output(causal: bool) -> None:
    torch.manual_seed(0)
    model = Llama(replace(ModelConfig(vocab_size=64), causal=causal)).eval()
    ids = torch.randint(64, (1, 16))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 64
    with torch.no_grad():
        first, second = model(ids), model(changed)
    assert not torch.equal(first[0, -1], second[0, -1])
    assert torch.equal(first[0, :-1], second[0, :-1]) is causal
