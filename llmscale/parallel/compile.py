"""torch.compile applied to a built model from outside, one decoder layer at a time (as
torchtitan does): every layer runs the same code, so one compiled graph serves them all and the
compile time does not grow with depth. The loss is compiled on its own: with the fused loss its
per-chunk work, otherwise the whole output layer and cross-entropy."""

import torch

from llmscale.models.llama import DecoderLayer, Llama


def apply_compile(model: Llama) -> None:
    for module in model.modules():
        if isinstance(module, DecoderLayer):
            module.compile()  # in place: names, state_dict and hooks stay the layer's own
    if model.fused_loss:
        model.fused_loss.compile()
    else:
        # An instance attribute, looked up at each call (the pipeline's loss_fn does too).
        model.loss = torch.compile(model.loss)
