"""Greedy generation with a key/value cache: the prompt runs through the model once, then each
new token attends to the keys and values cached for every token before it, so a step costs one
token's work. It walks `Llama`'s own modules (the model itself has no cache, training needs
none); tests/eval check it picks, token for token, what re-running the whole sequence picks."""

from typing import Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from llmscale.models import Llama
from llmscale.models.llama import apply_rotary

Cache = List[Tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [B, kv heads, T, d]


@torch.no_grad()
def greedy_generate(model: Llama, prompt: List[int], max_new_tokens: int,
                    stop_ids: Iterable[int] = (), vocab_size: Optional[int] = None) -> List[int]:
    """The new tokens, up to and without the first stop id. `vocab_size` keeps the choice to the
    tokenizer's ids (a padded embedding has rows no text maps to). The prompt loses its oldest
    tokens if prompt and answer would not fit the model's window."""
    if not prompt:
        raise ValueError("generation needs a prompt of at least one token")
    stops = set(stop_ids)
    prompt = prompt[-max(1, model.cfg.max_seq_len - max_new_tokens):]
    device = next(model.parameters()).device
    cache: Cache = []
    logits = _forward(model, torch.tensor([prompt], device=device), cache)
    generated: List[int] = []
    while len(generated) < max_new_tokens:
        token = int(logits[0, -1, :vocab_size].argmax())
        if token in stops:
            break
        generated.append(token)
        if len(prompt) + len(generated) >= model.cfg.max_seq_len:
            break
        logits = _forward(model, torch.tensor([[token]], device=device), cache)
    return generated


def _forward(model: Llama, input_ids: torch.Tensor, cache: Cache) -> torch.Tensor:
    """Logits [B, S, V] of `input_ids` [B, S] that follow the cached tokens, the cache extended
    by them: the whole prompt when the cache is empty (causal), else one token (which sees all)."""
    decoder = model.model
    start = cache[0][0].shape[2] if cache else 0
    seq_len = input_ids.shape[1]
    x = decoder.embed(input_ids)  # [S, B, H]
    cos, sin = decoder.rotary_emb(start + seq_len, x.dtype)
    cos, sin = cos[start:], sin[start:]
    for index, layer in enumerate(decoder.layers):
        attention = layer.self_attn
        h = layer.input_layernorm(x)
        q, k, v = (proj(h).view(seq_len, h.shape[1], -1, attention.head_dim).permute(1, 2, 0, 3)
                   for proj in (attention.q_proj, attention.k_proj, attention.v_proj))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if start:
            k, v = torch.cat((cache[index][0], k), dim=2), torch.cat((cache[index][1], v), dim=2)
            cache[index] = (k, v)
        else:
            cache.append((k, v))
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=not start,
            enable_gqa=attention.num_kv_heads != attention.num_heads)
        x = x + attention.o_proj(out.permute(2, 0, 1, 3).reshape(seq_len, h.shape[1], -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(decoder.norm(x[-1:])).transpose(0, 1)
