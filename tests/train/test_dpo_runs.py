"""DPO through the real launcher, the tiny model in fp32: two ranks train as one process does
(fine-tuning all weights at ZeRO-1, ZeRO-3, TP=2 with sequence parallelism and PP=2, the
reference pass then also on two ranks; LoRA at ZeRO-1 and PP=2), and a resumed run continues
the uninterrupted one bit for bit from the reference log-probs cached beside the pairs (also
through pipeline stages), and refuses to go on without them.

The global batch of 4 pairs is one micro-batch in one process, 2 ranks x 2 accumulated
micro-batches of 1 pair at ZeRO, 2 accumulated micro-batches of 2 under TP, and 4 micro-batches
of 1 pair through the 2 pipeline stages (whose last stage computes the loss and sends the
log-probs to the first, which logs them), so the runs agree only if the loss is the mean over
the global batch's pairs whatever the split. Adam runs
at eps 1e-6 and lr 3e-3: a weight whose gradient entries nearly cancel turns their round-off
into a step of up to the learning rate, which left the ZeRO-3 weights up to 2.3e-5 apart at
eps 1e-8, lr 3e-3, and 1.2e-5 apart at eps 1e-6, lr 1e-2, after four steps (measured; the
losses agreed within 1e-5 in both)."""

import json
import math
import shutil
import subprocess

import pytest
import torch
from launching import REPO_ROOT, clean_env, launch, metrics, pretrain_command

from llmscale.adapters.lora import is_adapter
from llmscale.checkpoint.checkpointer import find_latest_checkpoint
from llmscale.checkpoint.consolidate import consolidated_state_dict
from llmscale.data import ByteTokenizer
from llmscale.prep.chat import find_chat_template
from llmscale.prep.preference_dataset import write_preference_dataset

pytestmark = pytest.mark.slow

STEPS = 4
PLAYS = ["Hamlet", "Macbeth", "Othello", "King Lear", "The Tempest", "Julius Caesar"]
# Twelve pairs of uneven lengths: eight to train on, four held out (one global batch).
PAIRS = [{"prompt": f"Which play has speech {i}?", "chosen": PLAYS[i % 6] + ".",
          "rejected": PLAYS[(i + 1 + i % 4) % 6] + " (Act " + "I" * (1 + i % 3) + ")."}
         for i in range(12)]
TRAINED = ["adapter=none", "adapter=lora"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dpo_data")
    source = folder / "pairs.jsonl"
    source.write_text("".join(json.dumps(pair) + "\n" for pair in PAIRS))
    write_preference_dataset([source], folder / "prepared", ByteTokenizer(),
                             find_chat_template(None, None), warn=lambda _: None)
    return folder / "prepared"


def dpo(pairs_folder, *overrides):
    return [f"data.pairs={pairs_folder}", "data=pairs", "objective=dpo", "data.seq_len=128",
            "data.val_fraction=0.34", f"train.max_steps={STEPS}", "train.global_batch_size=4",
            "train.eval_batches=1", f"train.eval_interval={STEPS}", "optim.lr=3e-3",
            "optim.warmup_steps=1", "optim.eps=1e-6", *overrides]


# The pipeline's first and last stages differ, so its runs and their one-process baselines
# untie the embeddings. (The other layouts keep the tiny model's tied ones: untied, ZeRO-3's
# held-out loss after four steps drifted 1.5e-5 from one process's, measured.)
UNTIED = "model.tie_embeddings=false"
PIPELINE = ["train.micro_batch_size=1", "parallel.pp=2", UNTIED]


@pytest.fixture(scope="module")
def full_run(pairs, tmp_path_factory):
    """One process, all weights trained, saving at step 2 for the resume."""
    run_dir = tmp_path_factory.mktemp("full")
    stdout = launch("python", run_dir, *dpo(pairs, "train.micro_batch_size=4",
                                            "checkpoint.interval=2"))
    assert "reference log-probs of 12 pairs computed" in stdout
    return run_dir


@pytest.fixture(scope="module")
def untied_full_run(pairs, tmp_path_factory):
    """As `full_run`, untied, on its own copy of the pairs (its cache has another key)."""
    folder = tmp_path_factory.mktemp("untied_full")
    own_pairs = without_cache(pairs, folder / "pairs")
    launch("python", folder / "run", *dpo(own_pairs, "train.micro_batch_size=4", UNTIED))
    return own_pairs, folder / "run"


def one_process_lora(pairs_folder, run_dir, *overrides):
    """The reference is the base with the adapters off, computed at each step: no cache, and
    the first step's loss is ln 2."""
    stdout = launch("python", run_dir, *dpo(pairs_folder, "train.micro_batch_size=4",
                                            "adapter=lora", "adapter.dropout=0", *overrides))
    assert "reference log-probs" not in stdout
    assert metrics(run_dir, "loss")[1] == pytest.approx(math.log(2), abs=1e-7)
    return run_dir


@pytest.fixture(scope="module")
def lora_run(pairs, tmp_path_factory):
    return one_process_lora(pairs, tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def untied_lora_run(pairs, tmp_path_factory):
    return one_process_lora(pairs, tmp_path_factory.mktemp("untied_lora"), UNTIED)


def reference_cache(pairs_folder) -> torch.Tensor:
    (path,) = pairs_folder.glob("reference_logps-*.pt")
    return torch.load(path, weights_only=True)


def assert_same_run(run_dir, expected_dir, trained) -> None:
    # (Rewards are beta times a difference of log-probs near -100, whose round-off they inherit
    # undivided: compared through the loss, which they make, and the log-probs.)
    train, val = range(1, STEPS + 1), [0, STEPS]
    for name, steps in (("loss", train), ("logps/chosen", train), ("logps/rejected", train),
                        ("val_loss", val), ("val_logps/chosen", val)):
        values, expected = metrics(run_dir, name), metrics(expected_dir, name)
        assert sorted(values) == sorted(expected) == list(steps), name
        for step in steps:
            assert abs(values[step] - expected[step]) <= 1e-5 * max(1, abs(expected[step])), (
                name, step, values[step], expected[step])
    # The run learns (untied, its second epoch's last batch swings back above ln 2 at this lr).
    losses = metrics(expected_dir, "loss")
    assert min(losses[step] for step in train) < losses[1] - 0.05, losses
    saved, expected = (consolidated_state_dict(find_latest_checkpoint(run / "checkpoints"))
                       for run in (run_dir, expected_dir))
    assert saved.keys() == expected.keys()
    for name, tensor in expected.items():
        if trained(name):
            assert (saved[name] - tensor).abs().max() < 1e-5, name


def without_cache(pairs_folder, folder):
    """A copy of the pairs without their cache, so that a run computes the reference again."""
    shutil.copytree(pairs_folder, folder, ignore=shutil.ignore_patterns("reference_logps-*"))
    return folder


def assert_computes_the_same_reference(own_pairs, pairs, stdout) -> None:
    assert "reference log-probs of 12 pairs computed" in stdout
    torch.testing.assert_close(reference_cache(own_pairs), reference_cache(pairs),
                               rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("layout", [
    ["train.micro_batch_size=1"],
    ["train.micro_batch_size=1", "parallel.zero_stage=3"],
    # Megatron's vocabulary-parallel cross-entropy gives the per-token losses.
    ["train.micro_batch_size=2", "parallel.tp=2", "parallel.sequence_parallel=true"],
], ids=["zero1", "zero3", "tp2"])
def test_fine_tuning_on_two_ranks_matches_one_process(layout, pairs, full_run, tmp_path):
    own_pairs = without_cache(pairs, tmp_path / "pairs")
    stdout = launch("torchrun", tmp_path / "run", *dpo(own_pairs, *layout))
    assert_computes_the_same_reference(own_pairs, pairs, stdout)
    assert_same_run(tmp_path / "run", full_run, trained=lambda name: True)


@pytest.fixture(scope="module")
def pipeline_run(pairs, tmp_path_factory):
    """Two pipeline stages, all weights trained, on pairs without a cache: the stages compute
    the reference too; saving at step 2 for the resume."""
    folder = tmp_path_factory.mktemp("pipeline")
    own_pairs = without_cache(pairs, folder / "pairs")
    stdout = launch("torchrun", folder / "run", *dpo(own_pairs, *PIPELINE, "checkpoint.interval=2"))
    return own_pairs, folder / "run", stdout


def test_fine_tuning_through_pipeline_stages_matches_one_process(untied_full_run,
                                                                  pipeline_run):
    (expected_pairs, expected_run), (own_pairs, run_dir, stdout) = untied_full_run, pipeline_run
    assert_computes_the_same_reference(own_pairs, expected_pairs, stdout)
    assert_same_run(run_dir, expected_run, trained=lambda name: True)


def test_zero1_lora_on_two_ranks_matches_one_process(pairs, lora_run, tmp_path):
    launch("torchrun", tmp_path, *dpo(pairs, "train.micro_batch_size=1", "adapter=lora",
                                      "adapter.dropout=0"))
    assert_same_run(tmp_path, lora_run, trained=is_adapter)


def test_lora_through_pipeline_stages_matches_one_process(pairs, untied_lora_run, tmp_path):
    """The pipeline's reference is its own forward with the adapters off on every stage."""
    launch("torchrun", tmp_path, *dpo(pairs, *PIPELINE, "adapter=lora", "adapter.dropout=0"))
    assert_same_run(tmp_path, untied_lora_run, trained=is_adapter)


def test_a_resume_equals_the_uninterrupted_run_and_needs_its_reference(pairs, full_run,
                                                                        tmp_path):
    step_2 = full_run / "checkpoints" / "step_00000002"
    stdout = launch("python", tmp_path / "resumed",
                    *dpo(pairs, "train.micro_batch_size=4", f"train.resume={step_2}"))
    assert "resuming from" in stdout and "reference log-probs from" in stdout
    for name in ("loss", "rewards/chosen", "logps/rejected", "val_rewards/accuracies"):
        resumed, expected = metrics(tmp_path / "resumed", name), metrics(full_run, name)
        assert resumed == {step: expected[step] for step in resumed if step > 2}, name
    # The same pairs (files, times and all) elsewhere, without the cache: refused by name.
    moved = tmp_path / "moved"
    shutil.copytree(pairs, moved, ignore=shutil.ignore_patterns("reference_logps-*"))
    result = subprocess.run(
        pretrain_command("python", tmp_path / "refused", *dpo(
            moved, "train.micro_batch_size=4", f"train.resume={step_2}")),
        cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"reference log-probs are gone (no {moved}/reference_logps-" in result.stderr


def test_a_resume_through_pipeline_stages_equals_the_uninterrupted_run(pipeline_run, tmp_path):
    own_pairs, run_dir, _ = pipeline_run
    step_2 = run_dir / "checkpoints" / "step_00000002"
    stdout = launch("torchrun", tmp_path, *dpo(own_pairs, *PIPELINE, f"train.resume={step_2}"))
    assert "resuming from" in stdout and "reference log-probs from" in stdout
    assert sorted(metrics(tmp_path, "loss")) == [3, 4]
    for name in ("loss", "rewards/chosen", "logps/rejected", "val_rewards/accuracies"):
        resumed, expected = metrics(tmp_path, name), metrics(run_dir, name)
        assert resumed == {step: expected[step] for step in resumed if step > 2}, name
