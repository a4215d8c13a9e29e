"""Parameter and FLOP counts from the config alone, so 70B plans can be sized without
building the model."""

from llmscale.config.schema import ModelConfig


def _vocab_size(cfg: ModelConfig) -> int:
    if cfg.vocab_size is None:
        raise ValueError("model.vocab_size must be resolved from the tokenizer before counting")
    return cfg.vocab_size


def layer_matmul_parameters(cfg: ModelConfig, active: bool = False) -> int:
    """Weights of one decoder layer's matmuls: all of them, or (`active`) those one token
    passes through, which in an MoE layer are its top-k experts and the router."""
    d = cfg.hidden_size
    kv_dim = (cfg.num_kv_heads or cfg.num_heads) * (d // cfg.num_heads)
    attention = 2 * d * d + 2 * d * kv_dim  # q, o and k, v
    mlp = 3 * d * cfg.intermediate_size  # gate, up, down
    if not cfg.num_experts:
        return attention + mlp
    experts = cfg.moe_top_k if active else cfg.num_experts
    return attention + experts * mlp + d * cfg.num_experts


def count_parameters(cfg: ModelConfig) -> int:
    """Unique parameters of `Llama(cfg)`: a tied lm_head shares the embedding's weight."""
    d, vocab = cfg.hidden_size, _vocab_size(cfg)
    per_layer = layer_matmul_parameters(cfg) + 2 * d  # two RMSNorm weights
    embeddings = vocab * d if cfg.tie_embeddings else 2 * vocab * d
    return cfg.num_layers * per_layer + d + embeddings  # + final norm


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), the PaLM / Megatron estimate:

        6 * N_matmul + 12 * num_layers * hidden_size * seq_len

    N_matmul counts every weight a token's matmuls use: all attention and MLP projections (of
    an MoE layer, the router and top-k experts) plus lm_head (hidden_size * vocab_size, even when tied); not the embedding lookup, not norms.
    The second term is attention scores and weighted values, with no halving for causality.
    """
    n_matmul = (cfg.num_layers * layer_matmul_parameters(cfg, active=True)
                + cfg.hidden_size * _vocab_size(cfg))
    return float(6 * n_matmul + 12 * cfg.num_layers * cfg.hidden_size * seq_len)
