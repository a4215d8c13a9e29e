"""Pipeline parallelism: a built `Llama` cut into DeepSpeed `PipelineModule` stages.

The layer list is the model's own pieces, in order: the embedding, one entry per decoder layer,
then the final norm with the output layer. DeepSpeed balances the decoder layers over the stages
(the embedding joins the first, the head the last) and runs 1F1B. The last stage's loss
(`LastStageLoss`) is the model's, or, while a step runs an objective made of per-token losses
(DPO's pairs), that objective's. With document attention the embedding stage also computes the
tokens' positions within their documents, and they travel beside the activations (an integer
tensor, which gets no gradient), since later stages do not see the input ids. Stage parameters
are named `<index>.<piece>.<name>`; `canonical_name` gives back the Hugging Face name, which
checkpoint conversion and export use.
"""

import re
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional, Tuple, Union

import torch
from deepspeed.pipe import PipelineModule
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from deepspeed.runtime.utils import partition_balanced
from megatron.core import parallel_state
from torch import nn

from llmscale.config.plan import ParallelPlan
from llmscale.models.document_attention import find_documents
from llmscale.models.llama import DecoderLayer, Llama, RMSNorm, RotaryEmbedding

# Between stages: the residual stream, with the document positions when documents are kept apart.
Activations = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


class EmbeddingStage(nn.Module):
    def __init__(self, model: Llama) -> None:
        super().__init__()
        self.embed_tokens = model.model.embed_tokens
        self._embed = model.model.embed
        self._document_positions = model.model.document_positions

    def forward(self, input_ids: torch.Tensor) -> Activations:
        hidden = self._embed(input_ids)
        if self._document_positions is None:
            return hidden
        return hidden, self._document_positions(input_ids)


class DecoderStage(nn.Module):
    def __init__(self, layer: DecoderLayer, rope: RotaryEmbedding) -> None:
        super().__init__()
        self.layer = layer
        self.rope = rope  # registered so that its tables move to the stage's device

    def forward(self, activations: Activations) -> Activations:
        if isinstance(activations, torch.Tensor):
            return self.layer(activations, self.rope)
        hidden, position_ids = activations
        return self.layer(hidden, self.rope, find_documents(position_ids)), position_ids


class HeadStage(nn.Module):
    """The final norm; the output layer is held here, and run by the model's loss (`loss_fn`),
    which may fuse it with the cross-entropy."""

    def __init__(self, norm: RMSNorm, lm_head: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head

    def forward(self, activations: Activations) -> torch.Tensor:
        return self.norm(activations if isinstance(activations, torch.Tensor) else activations[0])


def pipeline_stages(model: Llama) -> List[nn.Module]:
    """The layer list: the model's own modules, wrapped."""
    decoder = model.model
    return [EmbeddingStage(model),
            *(DecoderStage(layer, decoder.rotary_emb) for layer in decoder.layers),
            HeadStage(decoder.norm, model.lm_head)]


def local_stages(stages: List[nn.Module], plan: ParallelPlan) -> List[nn.Module]:
    """The entries of `stages` this rank's pipeline stage runs, by the partition
    `PipelineModule` makes below (decoder layers balanced over the stages)."""
    parts = partition_balanced(weights=[int(isinstance(stage, DecoderStage)) for stage in stages],
                               num_parts=plan.pp)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    return stages[parts[stage]:parts[stage + 1]]


def build_pipeline(model: Llama, stages: List[nn.Module], plan: ParallelPlan) -> PipelineModule:
    """DeepSpeed keeps this rank's stages (and moves them to its device): only they need
    weights."""
    return PipelineModule(
        layers=stages,
        topology=PipeModelDataParallelTopology(num_pp=plan.pp, num_mp=plan.tp, num_dp=plan.dp),
        loss_fn=LastStageLoss(model),
        partition_method=f"type:{DecoderStage.__name__}",
    )


# An objective of the last stage: (per-token losses [S, B], labels [B, S], what else the
# pipeline's labels carry) -> the micro-batch's loss.
TokenLossObjective = Callable[..., torch.Tensor]


class LastStageLoss:
    """The pipeline's `loss_fn`: the model's loss of the last stage's output, or, while
    `token_loss_objective` sets one, an objective of its per-token losses."""

    def __init__(self, model: Llama) -> None:
        self.model = model
        self.objective: Optional[TokenLossObjective] = None

    def __call__(self, hidden: torch.Tensor, labels: Union[torch.Tensor, Tuple[torch.Tensor, ...]]
                 ) -> torch.Tensor:
        # `model.loss` is looked up at each call, so that a loss wrapped after the build (fault
        # injection) counts.
        if self.objective is None:
            return self.model.loss(hidden, *as_loss_arguments(labels))
        labels, *carried = as_loss_arguments(labels)
        return self.objective(self.model.loss(hidden, labels, per_token=True), labels, *carried)


@contextmanager
def token_loss_objective(module: PipelineModule, objective: TokenLossObjective) -> Iterator[None]:
    """The last stage computes `objective` instead of the model's loss while inside."""
    loss = module.loss_fn
    loss.objective = objective
    try:
        yield
    finally:
        loss.objective = None


def as_loss_arguments(labels: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]
                      ) -> Tuple[torch.Tensor, ...]:
    """The pipeline's labels are the labels, or (labels, the loss's denominator) when the step
    weighs the targets of its whole batch alike (llmscale.train.step), or (labels, what an
    objective needs beside them) under `token_loss_objective`."""
    return (labels,) if isinstance(labels, torch.Tensor) else tuple(labels)


_STAGE_PARAMETER = re.compile(r"^(\d+)\.(embed_tokens|layer|norm|lm_head)\.(.+)$")


def canonical_name(stage_name: str) -> str:
    """`3.layer.mlp.up_proj.weight` -> `model.layers.2.mlp.up_proj.weight`, and so on."""
    match = _STAGE_PARAMETER.match(stage_name)
    if not match:
        raise ValueError(f"{stage_name!r} is not a pipeline-stage parameter name")
    index, piece, rest = int(match.group(1)), match.group(2), match.group(3)
    if piece == "layer":
        return f"model.layers.{index - 1}.{rest}"
    if piece == "lm_head":
        return f"lm_head.{rest}"
    return f"model.{piece}.{rest}"
