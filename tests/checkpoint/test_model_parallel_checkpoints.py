"""A tensor x pipeline parallel save exports to one Hugging Face model equal to the trained one.
(Resuming on other layouts: tests/checkpoint/test_recovery_matrix.py.)"""

import pytest
import torch
from launching import launch
from transformers import LlamaForCausalLM

from llmscale.checkpoint.consolidate import consolidated_state_dict, model_config_of
from llmscale.models import Llama

STEPS, SAVED_AT = 10, 5
COMMON = [f"train.max_steps={STEPS}", f"checkpoint.interval={SAVED_AT}",
          "model.tie_embeddings=false"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, uninterrupted: its weights at the step the tensor x pipeline run saves."""
    run_dir = tmp_path_factory.mktemp("reference")
    launch("python", run_dir, *COMMON, f"train.exit_at_step={SAVED_AT}")
    return run_dir


def saved_step(run_dir):
    return run_dir / "checkpoints" / f"step_{SAVED_AT:08d}"


def test_tensor_and_pipeline_shards_export_as_one_hf_model(reference, tmp_path):
    from test_hf_conversion import load_tool, logits_of

    launch("torchrun", tmp_path, *COMMON, "parallel.tp=2", "parallel.pp=2",
           f"train.exit_at_step={SAVED_AT}", ranks=4)
    step_dir = saved_step(tmp_path)
    merged, trained = consolidated_state_dict(step_dir), consolidated_state_dict(
        saved_step(reference))
    assert set(merged) == set(trained)
    for name, tensor in trained.items():
        assert merged[name].shape == tensor.shape, name
        assert (merged[name] - tensor).abs().max().item() < 1e-5, name

    assert load_tool().main(["to-hf", str(step_dir), str(tmp_path / "hf")]) == 0
    ours = Llama(model_config_of(step_dir)).eval()
    ours.load_state_dict(trained, strict=True)
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    vocab = ours.cfg.vocab_size
    assert (logits_of(ours, vocab) - logits_of(theirs, vocab)).abs().max().item() < 1e-4
