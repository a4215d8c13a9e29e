"""Llama-family decoder in plain PyTorch.

Parameter names follow Hugging Face `LlamaForCausalLM` exactly and RoPE uses its
"rotate_half" convention, so a state_dict loads into either model without renaming or
permuting. Parallelism is applied from outside (`llmscale.parallel`), never in here: it swaps
the linear layers and the embedding for tensor-parallel ones and `token_losses` for the
vocabulary-parallel cross-entropy, and cuts the model into pipeline stages along `embed`,
the layers and `head`; so is keeping packed documents apart (`use_document_attention`).
Activations run sequence-first, [seq, batch, hidden], the layout Megatron's sequence-parallel
regions split along their first dimension.
"""

import math
import zlib
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from llmscale.adapters.lora import is_adapter, lora_initial_value
from llmscale.config.schema import ModelConfig
from llmscale.models.document_attention import Documents, document_attention, find_documents
from llmscale.models.fused_loss import IGNORE_INDEX, LinearCrossEntropy
from llmscale.models.mlp import MLP
from llmscale.models.moe import MoEFeedForward


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token losses [S, B] of logits [S, B, V] in fp32; ignored targets give 0."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none",
                           ignore_index=IGNORE_INDEX).view(labels.shape)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and scale after casting back, as HF does, so bf16 results match.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position up to max_seq_len, shaped [max_seq_len, head_dim],
    kept in fp32 and, once asked for, in the compute dtype: every layer reads the same cast."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.theta = theta
        # Non-persistent: derived from the config, so they stay out of checkpoints.
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim), persistent=False)
        self._cast_tables = {}
        self.reset_buffers()

    def reset_buffers(self) -> None:
        inv_freq = 1.0 / (
            self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim)
        )
        positions = torch.arange(self.max_seq_len, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        # rotate_half pairs dimension i with i + head_dim/2, hence the two halves repeat.
        angles = torch.cat((freqs, freqs), dim=-1)
        with torch.no_grad():
            self.cos.copy_(angles.cos())
            self.sin.copy_(angles.sin())
        self._cast_tables.clear()

    def _apply(self, fn, recurse=True):
        self._cast_tables.clear()  # cast from the moved or converted tables when next asked
        return super()._apply(fn, recurse)

    def forward(self, seq_len: int, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [seq_len, head_dim] in `dtype`."""
        if seq_len > self.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds max_seq_len {self.max_seq_len}")
        if torch.compiler.is_compiling():  # a compiled graph fuses the cast into its consumers
            return self.cos[:seq_len].to(dtype), self.sin[:seq_len].to(dtype)
        if dtype not in self._cast_tables:
            self._cast_tables[dtype] = (self.cos.to(dtype), self.sin.to(dtype))
        cos, sin = self._cast_tables[dtype]
        return cos[:seq_len], sin[:seq_len]

    def at(self, position_ids: torch.Tensor, dtype: torch.dtype
           ) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [B, S, 1, head_dim] at position ids [B, S] (broadcast over the heads)."""
        cos, sin = self(position_ids.shape[-1], dtype)
        return cos[position_ids].unsqueeze(2), sin[position_ids].unsqueeze(2)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads or cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.causal = cfg.causal
        kv_dim = self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=False)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding,
                documents: Optional[Documents] = None) -> torch.Tensor:
        """Self-attention over the whole sequence (causal unless the model is an encoder), or,
        given `documents`, causal within each document, with RoPE positions counted from each
        document's start."""
        # Head counts are inferred (-1): a tensor-parallel rank holds a share of the heads. The
        # sequence length is read after the projections, which gather a sequence-parallel input.
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        seq_len, batch = q.shape[:2]
        q, k, v = (t.view(seq_len, batch, -1, self.head_dim) for t in (q, k, v))
        # enable_gqa only when needed: with it set, some fused kernels are ruled out.
        gqa = self.num_kv_heads != self.num_heads
        if documents is None:
            q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
            cos, sin = rope(seq_len, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=gqa)
            out = out.permute(2, 0, 1, 3)
        else:
            # Batch-major [B, S, heads, d], flattened to the kernels' [B*S, heads, d].
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
            cos, sin = rope.at(documents.position_ids, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            out = document_attention(*(t.flatten(0, 1) for t in (q, k, v)), documents, gqa)
            out = out.view(batch, seq_len, -1, self.head_dim).transpose(0, 1)
        return self.o_proj(out.reshape(seq_len, batch, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MoEFeedForward(cfg) if cfg.num_experts else MLP(cfg)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding,
                documents: Optional[Documents] = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, documents)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The body without the output head; `Llama.model`, named as in HF."""

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        # One table shared by all layers rather than a copy per layer.
        self.rotary_emb = RotaryEmbedding(
            cfg.hidden_size // cfg.num_heads, cfg.max_seq_len, cfg.rope_theta
        )
        # Input ids [B, S] to positions within their documents; None attends across the whole
        # sequence. Set by `Llama.use_document_attention`.
        self.document_positions: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, S] to the residual stream [S, B, H]."""
        return self.embed_tokens(input_ids.t())

    def documents(self, input_ids: torch.Tensor) -> Optional[Documents]:
        """The documents of a batch of input ids [B, S], if they are kept apart."""
        if self.document_positions is None:
            return None
        return find_documents(self.document_positions(input_ids))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        documents = self.documents(input_ids)
        for layer in self.layers:
            x = layer(x, self.rotary_emb, documents)
        return self.norm(x)


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size must be resolved from the tokenizer before building")
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(
                f"hidden_size {cfg.hidden_size} not divisible by num_heads {cfg.num_heads}"
            )
        if cfg.num_heads % (cfg.num_kv_heads or cfg.num_heads):
            raise ValueError(
                f"num_heads {cfg.num_heads} not divisible by num_kv_heads {cfg.num_kv_heads}"
            )
        self.cfg = cfg
        # Drawn from the global generator, which the run seeds, before the submodules' own
        # default initialisation (skipped on the meta device) draws from it: every parameter's
        # generator is seeded from it and the parameter's name (see `initial_value`).
        self.init_seed = int(torch.randint(2**31 - 1, (), device="cpu"))
        self.model = Decoder(cfg, cfg.vocab_size)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # The plain loss; parallelism or `use_fused_loss` swap them from outside.
        self.token_losses = token_cross_entropy
        self.fused_loss: Optional[LinearCrossEntropy] = None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise parameters and RoPE tables; also the step after meta-device `to_empty()`
        (parameters still on the meta device are left for `initial_value` to fill later)."""
        if self.cfg.tie_embeddings:
            # Tied here rather than in __init__ because `to_empty()` gives each module its own
            # tensor again.
            self.lm_head.weight = self.model.embed_tokens.weight
        for name, param in self.named_parameters():
            if not param.is_meta:
                param.copy_(self.initial_value(name, param.shape))
        self.model.rotary_emb.reset_buffers()

    def initial_value(self, name: str, shape: Sequence[int]) -> torch.Tensor:
        """Parameter `name`'s initial value at its full `shape`. It depends on the name and the
        model's `init_seed` only, so a rank that holds a shard (tensor or pipeline parallel)
        draws the same values for it as one process does for the whole model."""
        if name.endswith("norm.weight"):
            return torch.ones(shape)
        generator = torch.Generator().manual_seed(self.init_seed + zlib.crc32(name.encode()))
        if is_adapter(name):
            return lora_initial_value(name, shape, generator)
        std = self.cfg.init_std
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            # Residual-branch outputs shrink with depth so the residual stream's variance stays
            # roughly constant at init (GPT-2 / Megatron).
            std /= math.sqrt(2 * self.cfg.num_layers)
        return torch.empty(shape).normal_(0.0, std, generator=generator)

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor,
             denominator: Optional[torch.Tensor] = None, per_token: bool = False
             ) -> torch.Tensor:
        """Mean token cross-entropy of the output layer over the final hidden states [S, B, H]
        against labels [B, S] (already shifted: labels[b, t] is the target at position t, -100
        ignored), computed in fp32; in training, plus the MoE layers' load-balancing loss.
        `denominator` (a scalar) replaces the count of this batch's targets: the summed token
        losses are divided by it, so that a step can weigh every target of its global batch
        alike (llmscale.train.step). `per_token`: the token losses themselves, [S, B] (0 where
        ignored), for objectives that sum them per sequence (llmscale.objectives)."""
        labels = labels.t()
        if per_token:
            if self.fused_loss:
                raise ValueError("the fused loss returns a batch's summed loss, not per-token "
                                 "losses: build without train.fused_loss")
            return self.token_losses(self.lm_head(hidden), labels)
        if self.fused_loss:
            loss_sum = self.fused_loss(hidden, self.lm_head.weight, labels)
        else:
            loss_sum = self.token_losses(self.lm_head(hidden), labels).sum()
        if denominator is None:
            denominator = (labels != IGNORE_INDEX).sum().clamp(min=1)
        loss = loss_sum / denominator
        if self.cfg.num_experts and self.training:
            # Evaluation reports the language-model loss alone.
            aux_losses = [layer.mlp.aux_loss for layer in self.model.layers]
            loss = loss + self.cfg.moe_aux_loss_coef * torch.stack(aux_losses).sum()
        return loss

    def use_fused_loss(self) -> None:
        """Compute the loss with `LinearCrossEntropy`: logits one chunk of tokens at a time."""
        self.fused_loss = LinearCrossEntropy(self.cfg.vocab_size)

    def use_document_attention(
        self, document_positions: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        """Keep the documents packed into a sample apart: every layer attends causally within
        each document only, and RoPE positions restart at each document. `document_positions`
        maps input ids [B, S] to each token's position within its document, e.g.
        `llmscale.data.document_position_ids` with the tokenizer's EOD id."""
        self.model.document_positions = document_positions

    def forward(
        self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
        denominator: Optional[torch.Tensor] = None, per_token: bool = False,
    ) -> torch.Tensor:
        """Logits [B, S, V]; or, given labels, the loss (see `loss`)."""
        hidden = self.model(input_ids)
        if labels is None:
            return self.lm_head(hidden).transpose(0, 1)
        return self.loss(hidden, labels, denominator, per_token)
