"""An adapter run's frozen base stays out of its checkpoints and is made again from its source:
the seeded weights equal the ones a run draws, a save's state dict holds the adapters alone
(a tied head included), a missing weights folder is named, and a resume on another base than
the checkpoint's (its fingerprint) is refused."""

import json
import shutil

import pytest
import torch

from llmscale.adapters.lora import apply_lora, is_adapter
from llmscale.checkpoint.checkpointer import STATE_FILE, check_frozen_base
from llmscale.checkpoint.frozen_base import (
    base_fingerprint, frozen_parameters_left_out, initial_weights_dir, seeded_weights,
)
from llmscale.checkpoint.hf import save_weights
from llmscale.config.load import ConfigError
from llmscale.config.schema import AdapterConfig, AdapterKind, ModelConfig, TrainConfig
from llmscale.models import Llama

TINY = dict(name="tiny", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            intermediate_size=128, vocab_size=96, max_seq_len=32)


@pytest.mark.parametrize("tied", [True, False])
def test_seeded_weights_are_those_the_run_draws(tied):
    cfg = ModelConfig(**TINY, tie_embeddings=tied)
    torch.manual_seed(3)
    expected = Llama(cfg).state_dict()  # as the trainer: seed, then build
    generator_state = torch.random.get_rng_state()
    weights = seeded_weights(cfg, 3)
    assert torch.equal(torch.random.get_rng_state(), generator_state)
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[name], tensor) for name, tensor in expected.items())
    assert (weights["lm_head.weight"] is weights["model.embed_tokens.weight"]) == tied


def test_a_save_leaves_out_every_frozen_parameter_under_each_name():
    model = Llama(ModelConfig(**TINY, tie_embeddings=True))
    apply_lora(model, AdapterConfig(kind=AdapterKind.lora))
    everything = model.state_dict().keys()
    with frozen_parameters_left_out(model):
        saved = model.state_dict().keys()
    assert saved and all(is_adapter(name) for name in saved)
    assert saved == {name for name in everything if is_adapter(name)}
    assert model.state_dict().keys() == everything  # only while open


def test_a_missing_weights_folder_is_named(tmp_path):
    assert initial_weights_dir(None) is None
    with pytest.raises(ConfigError, match="create one with"):
        initial_weights_dir(str(tmp_path / "gone"))
    step_dir = tmp_path / "step_00000004"
    with pytest.raises(ConfigError, match=f"{tmp_path / 'gone'} has no model.yaml, it was moved"):
        initial_weights_dir(str(tmp_path / "gone"), step_dir)


def test_the_base_fingerprint_follows_the_weights_not_the_folder(tmp_path):
    cfg = ModelConfig(**TINY)
    torch.manual_seed(0)
    weights = Llama(cfg).state_dict()
    first = save_weights(weights, cfg, tmp_path / "first")
    shutil.copytree(first, tmp_path / "moved")
    changed = dict(weights, **{"model.norm.weight": weights["model.norm.weight"] * 2})
    other = save_weights(changed, cfg, tmp_path / "other")
    train = TrainConfig(seed=5)
    fingerprint = base_fingerprint(train, first)
    assert fingerprint.startswith("sha256 ")
    assert base_fingerprint(train, tmp_path / "moved") == fingerprint
    assert base_fingerprint(train, other) != fingerprint
    assert base_fingerprint(train, None) == "seed 5" != base_fingerprint(TrainConfig(seed=6), None)


def test_a_resume_on_another_base_is_refused_naming_train_init_from(tmp_path):
    (tmp_path / STATE_FILE).write_text(json.dumps({"frozen_base": "sha256 abc"}))
    check_frozen_base(tmp_path, "sha256 abc", TrainConfig())
    with pytest.raises(ConfigError, match="train.init_from=other/base, train.seed=42"):
        check_frozen_base(tmp_path, "sha256 def", TrainConfig(init_from="other/base", seed=42))
    (tmp_path / STATE_FILE).write_text(json.dumps({}))  # saved before fingerprints: unchecked
    check_frozen_base(tmp_path, "sha256 def", TrainConfig())
