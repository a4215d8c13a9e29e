"""Activation checkpointing of every decoder layer, applied from outside the model.

full: only each layer's input is kept; the whole layer runs again in the backward pass.
selective: the outputs of the matrix multiplications and of attention are kept and only the
element-wise ops between them (norms, RoPE, SiLU, products) run again, the trade torchtitan's
op-level selective checkpointing makes: little recompute, most of the memory of the
element-wise intermediates saved.
Non-reentrant checkpointing throughout: DeepSpeed's pipeline engine and ZeRO both work with it.
"""

from functools import partial

import torch
import torch.nn.attention.varlen  # noqa: F401  (registers torch.ops.torch_attn, used below)
from torch.utils.checkpoint import (
    CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts,
)

from llmscale.config.schema import ActivationCheckpointing
from llmscale.models.llama import DecoderLayer

_aten = torch.ops.aten
_SAVED_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    # Document attention's flash kernel.
    torch.ops.torch_attn._varlen_attn.default,
    # A row-parallel layer all-reduces its matmul's output in place. The matmul's output is
    # kept, so it is reduced already when the recompute comes; were the all-reduce recomputed,
    # it would sum the sum again. Kept, it is not run twice, and costs no memory of its own.
    torch.ops.c10d.allreduce_.default,
}


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_keep_matmuls)


def apply_activation_checkpointing(model: torch.nn.Module, mode: ActivationCheckpointing) -> None:
    if mode is ActivationCheckpointing.none:
        return
    options = {"use_reentrant": False}
    if mode is ActivationCheckpointing.selective:
        options["context_fn"] = _selective_contexts
    for layer in model.modules():
        if isinstance(layer, DecoderLayer):
            # An instance attribute: names, state_dict and hooks of the layer stay as they were.
            layer.forward = partial(checkpoint, layer.forward, **options)
