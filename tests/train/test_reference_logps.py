"""The reference log-probs of every pair: each is the direct sum of log-softmax over its response
tokens, a fresh policy's sigmoid DPO loss against them is ln 2 at step 0, and the cache is
reused, keyed by what the numbers depend on, and its loss refused on a resume."""

import json
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from single_rank import one_rank_process_group

from llmscale.config import load_config
from llmscale.config.load import ConfigError
from llmscale.config.plan import ParallelPlan
from llmscale.data import ByteTokenizer, GlobalSampleOrder, rank_micro_batches
from llmscale.data.build import resolve_vocab_size
from llmscale.data.preference_pairs import build_pair_datasets
from llmscale.models import Llama
from llmscale.models.fused_loss import IGNORE_INDEX
from llmscale.objectives.preference_batch import pair_logps, pair_preference, with_reference
from llmscale.prep.chat import find_chat_template
from llmscale.prep.preference_dataset import write_preference_dataset
from llmscale.train.reference_logps import reference_cache_path, reference_logps

PAIRS = [{"prompt": f"Question {i}?", "chosen": f"Right {i}.",
          "rejected": "Wrong" + " answer" * (i % 3) + "."} for i in range(7)]
# Micro-batches of 3 pairs: the 5 training pairs take two rounds, the last one short.
PLAN = ParallelPlan(world_size=1, dp=1, tp=1, pp=1, zero_stage=0, micro_batch_size=3,
                    grad_accum_steps=1, global_batch_size=3)


@pytest.fixture
def run(tmp_path):
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(pair) + "\n" for pair in PAIRS))
    write_preference_dataset([source], tmp_path / "pairs", ByteTokenizer(),
                             find_chat_template(None, None), warn=lambda _: None)
    cfg = load_config(["+exp=tiny", "objective=dpo", "data=pairs", "data.pairs=pairs",
                       "data.seq_len=96", "data.val_fraction=0.25"])
    cfg.model.vocab_size = resolve_vocab_size(cfg.model, ByteTokenizer().vocab_size)
    splits = build_pair_datasets("pairs", 96, 0.25, ByteTokenizer(), tmp_path)
    torch.manual_seed(0)
    model = Llama(cfg.model)
    with one_rank_process_group():
        parallel_state.initialize_model_parallel()
        yield cfg, splits, model, partial(reference_logps, model, cfg, tmp_path, splits, PLAN, 0,
                                          torch.device("cpu"), is_main=True), tmp_path


def direct_logps(model, inputs, labels) -> float:
    """log p(response | prompt) from the model's whole logits."""
    with torch.no_grad():
        logits = model(inputs[None])[0]
    kept = labels != IGNORE_INDEX
    return F.log_softmax(logits[kept].double(), -1).gather(-1, labels[kept, None]).sum().item()


def test_the_reference_is_each_responses_log_prob_and_step_zero_dpo_is_ln_2(run):
    cfg, (train, val), model, reference, _ = run
    lines = []
    table = reference(resumed=False, report=lines.append)
    assert table.shape == (7, 2) and "reference log-probs of 7 pairs computed" in lines[0]
    for split in (train, val):
        for index in range(len(split)):
            inputs, labels, pair = split[index]
            for side in range(2):
                assert table[pair, side].item() == pytest.approx(
                    direct_logps(model, inputs[side], labels[side]), abs=2e-4)
    batches = rank_micro_batches(train, GlobalSampleOrder(len(train), 1), 0, 4, 1, 0, 1)
    (inputs, labels, expected), = with_reference(batches, table)
    model.train()
    result = pair_preference(cfg.dpo, pair_logps(partial(model, per_token=True), inputs, labels),
                             expected)
    torch.testing.assert_close(result.losses, torch.full((4,), math.log(2)), atol=1e-6, rtol=0)
    assert result.metrics()["rewards/margins"].abs() < 1e-5


def test_the_cache_is_reused_and_a_resume_without_it_is_refused(run):
    cfg, _, _, reference, root = run
    computed = reference(resumed=False, report=lambda _: None)
    lines = []
    assert torch.equal(reference(resumed=True, report=lines.append), computed)
    path = reference_cache_path(cfg, root)
    assert lines == [f"reference log-probs from {path}"]
    path.unlink()
    with pytest.raises(ConfigError, match=f"reference log-probs are gone \\(no {path}\\)"):
        reference(resumed=True, report=lambda _: None)


def test_the_cache_key_follows_the_initial_weights_data_and_window_not_the_layout(run):
    cfg, _, _, _, root = run
    path = reference_cache_path(cfg, root)
    cfg.parallel.zero_stage, cfg.train.micro_batch_size = 3, 1
    assert reference_cache_path(cfg, root) == path
    for field, value in (("seed", 7), ("precision", "bf16")):
        changed = load_config(["+exp=tiny", "data=pairs", "data.pairs=pairs",
                               "data.seq_len=96", f"train.{field}={value}"])
        changed.model.vocab_size = cfg.model.vocab_size
        assert reference_cache_path(changed, root) != path, field
    (root / "pairs" / "chosen.bin").touch()  # the data rewritten
    assert reference_cache_path(cfg, root) != path
