"""The pipeline's stages, chained in one process, compute what the model does."""

from functools import partial

import torch

from llmscale.config.schema import ModelConfig
from llmscale.data import document_position_ids
from llmscale.models import Llama
from llmscale.parallel.pipeline import pipeline_stages

EOD = 0


def test_stages_carry_document_positions_to_every_layer() -> None:
    torch.manual_seed(0)
    model = Llama(ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                              intermediate_size=48, vocab_size=64, max_seq_len=16))
    model.use_document_attention(partial(document_position_ids, eod_id=EOD))
    ids = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    ids[0, 3] = ids[1, 7] = EOD
    activations = ids
    for stage in pipeline_stages(model):
        activations = stage(activations)
    torch.testing.assert_close(activations, model.model(ids), rtol=0, atol=0)
    # A stage that dropped the positions would attend across documents.
    model.model.document_positions = None
    assert not torch.allclose(activations, model.model(ids))
