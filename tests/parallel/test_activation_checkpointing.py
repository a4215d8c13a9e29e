"""Recomputing layers in the backward pass changes no gradient, documents kept apart too."""

import copy
from functools import partial

import pytest
import torch

from llmscale.config.schema import ActivationCheckpointing, ModelConfig
from llmscale.data import document_position_ids
from llmscale.models import Llama
from llmscale.parallel.activation_checkpointing import apply_activation_checkpointing

EOD = 0


@pytest.mark.parametrize("mode", [ActivationCheckpointing.full, ActivationCheckpointing.selective])
def test_recompute_with_document_attention_keeps_gradients(mode) -> None:
    torch.manual_seed(0)
    model = Llama(ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                              intermediate_size=48, vocab_size=64, max_seq_len=16))
    model.use_document_attention(partial(document_position_ids, eod_id=EOD))
    recomputed = copy.deepcopy(model)
    apply_activation_checkpointing(recomputed, mode)
    ids = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    ids[0, 3] = ids[1, 7] = EOD
    for each in (model, recomputed):
        each(ids, ids).backward()
    for (name, ours), theirs in zip(recomputed.named_parameters(), model.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=0, msg=name)
