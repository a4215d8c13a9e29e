"""Evaluating a QLoRA run: its checkpoint holds the adapters alone (no base to merge them into:
a KeyError once), so the evaluated model is the base made again from the run's seed, NF4-rounded
as the run held it, with the adapters merged: what the run trained."""

import json

import pytest
import torch
from launching import launch

from llmscale.adapters.lora import apply_lora
from llmscale.checkpoint.checkpointer import find_latest_checkpoint
from llmscale.checkpoint.consolidate import consolidated_state_dict, model_config_of
from llmscale.checkpoint.frozen_base import seeded_weights
from llmscale.checkpoint.peft_export import adapter_config_of
from llmscale.eval.cli import main
from llmscale.eval.model_source import load_model
from llmscale.models import Llama

SEED = 42  # train.seed of the tiny experiment


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("qlora")
    launch("python", run_dir, "adapter=qlora", "adapter.dropout=0", "model.intermediate_size=384",
           "train.max_steps=2", "optim.lr=1e-2", "checkpoint.interval=0", "train.eval_batches=1")
    return run_dir


def test_the_evaluate_tool_scores_a_qlora_run(qlora_run, tmp_path):
    out = tmp_path / "perplexity.json"
    assert main(["perplexity", str(qlora_run), "--tokenizer", "byte", "--output", str(out),
                 "--data", "data/shakespeare/tempest.txt", "--seq-len", "48",
                 "--max-windows", "2", "--batch-size", "2"]) == 0
    assert json.loads(out.read_text())["metrics"]["tokens"] == 96


def test_the_loaded_model_is_the_qlora_model_the_run_trained(qlora_run):
    step_dir = find_latest_checkpoint(qlora_run / "checkpoints")
    cfg = model_config_of(step_dir)
    trained = Llama(cfg).eval()
    trained.load_state_dict(seeded_weights(cfg, SEED))
    apply_lora(trained, adapter_config_of(step_dir))  # quantises the base to NF4
    trained.load_state_dict(consolidated_state_dict(step_dir), strict=False)
    input_ids = torch.randint(0, cfg.vocab_size, (2, 24),
                              generator=torch.Generator().manual_seed(1))
    loaded = load_model(qlora_run).model
    with torch.no_grad():
        expected, actual = trained(input_ids), loaded(input_ids)
        unadapted = Llama(cfg).eval()
        unadapted.load_state_dict(seeded_weights(cfg, SEED))
        assert (unadapted(input_ids) - expected).abs().max() > 1e-3  # the rounding and adapters
    assert (actual - expected).abs().max() < 1e-5
