"""A tensor-parallel model's own state_dict loads back into it: what a same-layout resume and a
rollback do (DeepSpeed loads the saved module strictly)."""

import torch
from megatron.core import parallel_state
from single_rank import one_rank_process_group

from llmscale.config.schema import ModelConfig
from llmscale.models import Llama
from llmscale.parallel.megatron_cpu import allow_megatron_layers_on_cpu
from llmscale.parallel.tensor_parallel import apply_tensor_parallel


def test_state_dict_round_trips_strictly_without_extra_state():
    with one_rank_process_group():
        allow_megatron_layers_on_cpu()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
        torch.manual_seed(0)
        model = Llama(ModelConfig(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                                  intermediate_size=48, vocab_size=64, tie_embeddings=False))
        apply_tensor_parallel(model, sequence_parallel=False)
        saved = model.state_dict()
        # Checkpoint tools (ds_to_universal) take every entry for a tensor.
        assert not [name for name in saved if name.endswith("_extra_state")]
        result = model.load_state_dict(saved, strict=True)
        assert not result.missing_keys and not result.unexpected_keys
