"""Checkpoints across tensor and pipeline layouts: a run saved with one (tp, pp) resumes with
another, from 1 to 4 CPU ranks, as if never stopped; and a tensor x pipeline parallel save
exports to one Hugging Face model equal to the trained one."""

import pytest
import torch
from launching import launch, metric_lines, metrics
from transformers import LlamaForCausalLM

from llmscale.checkpoint.consolidate import consolidated_state_dict, model_config_of
from llmscale.models import Llama

STEPS, SAVED_AT = 10, 5
COMMON = [f"train.max_steps={STEPS}", f"checkpoint.interval={SAVED_AT}",
          "model.tie_embeddings=false"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, uninterrupted: its losses, and its weights at the step the others save."""
    run_dir = tmp_path_factory.mktemp("reference")
    launch("python", run_dir, *COMMON)
    return run_dir


def saved_step(run_dir):
    return run_dir / "checkpoints" / f"step_{SAVED_AT:08d}"


@pytest.mark.parametrize(("saved", "resumed"), [
    pytest.param((2, ["parallel.tp=2"]), (1, []), id="tp2-to-1"),
    pytest.param((2, ["parallel.pp=2"]), (1, []), id="pp2-to-1"),
    pytest.param((1, []), (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]), id="1-to-tp2"),
    pytest.param((1, []), (2, ["parallel.pp=2"]), id="1-to-pp2"),
    pytest.param((4, ["parallel.tp=2", "parallel.pp=2"]), (2, ["parallel.pp=2"]),
                 id="tp2pp2-to-pp2"),
])
def test_saved_layout_resumes_in_another(saved, resumed, reference, tmp_path):
    (save_ranks, save_plan), (resume_ranks, resume_plan) = saved, resumed
    launch("torchrun", tmp_path, *COMMON, *save_plan, f"train.exit_at_step={SAVED_AT}",
           ranks=save_ranks)
    lines_before = metric_lines(tmp_path)
    stdout = launch("torchrun", tmp_path, *COMMON, *resume_plan, ranks=resume_ranks)
    assert "converting it to a universal checkpoint" in stdout
    resumed_losses, expected = metrics(tmp_path, "loss", lines_before), metrics(reference, "loss")
    assert sorted(resumed_losses) == list(range(SAVED_AT + 1, STEPS + 1))
    for step, loss in resumed_losses.items():
        assert abs(loss - expected[step]) / expected[step] < 1e-5, (step, loss, expected[step])


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
