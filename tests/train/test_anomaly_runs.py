"""Whole 2-rank runs meeting a NaN loss and a loss spike, injected on the last rank only, under
each `train.on_anomaly` policy.

The reference for "as if the batch was never seen" is built from checkpoints, not from a second
implementation: a run stopped right before the faulty batch, its checkpoint edited to pass over
that batch (step and consumed samples one global batch further, weights, optimizer and LR
schedule untouched), then resumed. The model draws no random numbers while training, so the
RNG states do not enter the comparison."""

import json
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from launching import REPO_ROOT, clean_env, launch, metrics, pretrain_command

from llmscale.checkpoint.checkpointer import STATE_FILE, step_dir_name
from llmscale.checkpoint.manifest import MANIFEST_FILE, write_manifest

pytestmark = pytest.mark.slow

GLOBAL_BATCH = 16  # the tiny experiment's
SEQ_LEN = 128
STEPS = 9


def _records(run_dir: Path) -> List[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / step_dir_name(step)


def _pass_over_batches(step_dir: Path, batches: int, steps: int) -> None:
    """Edit a checkpoint as if its run had gone on `batches` global batches further in the sample
    order and `steps` steps further in the step count, without updating anything."""
    state_file = step_dir / STATE_FILE
    record = json.loads(state_file.read_text())
    state = record["train_state"]
    state["step"] += steps
    state["consumed_samples"] += batches * GLOBAL_BATCH
    state["consumed_tokens"] += batches * GLOBAL_BATCH * SEQ_LEN
    state_file.write_text(json.dumps(record, indent=2))
    (step_dir / MANIFEST_FILE).unlink()
    write_manifest(step_dir)  # so that the resume's integrity check accepts the edit


def _deepspeed_counters(step_dir: Path) -> Dict[str, int]:
    states = torch.load(sorted(step_dir.glob("*model_states.pt"))[0], weights_only=False)
    return {"global_steps": states["global_steps"], "skipped_steps": states["skipped_steps"],
            "lr_schedule_steps": states["lr_scheduler"]["last_epoch"]}


@pytest.mark.parametrize("zero_stage", [0, 1, 3])
def test_skipped_steps_equal_a_run_that_never_saw_their_batches(zero_stage, tmp_path):
    """NaN in batch 3 and a 100x spike in batch 7 (after a 3-step spike window). At ZeRO-1 the
    NaN is also caught by DeepSpeed's own overflow check; the finite spike is caught by
    llmscale's alone, at every stage."""
    common = [f"train.max_steps={STEPS}", f"parallel.zero_stage={zero_stage}",
              "checkpoint.interval=0"]
    faulty, reference = tmp_path / "faulty", tmp_path / "reference"
    stdout = launch("torchrun", faulty, *common, "train.inject_nan_at_batch=3",
                    "train.inject_spike_at_batch=7", "train.spike_window=3")

    # The reference trains batches 1-2, 4-6 and 8-9 as steps 1-2, 4-6 and 8-9.
    launch("torchrun", reference, *common, "train.exit_at_step=2")
    _pass_over_batches(_checkpoint(reference, 2), batches=1, steps=1)
    launch("torchrun", reference, *common, f"train.resume={_checkpoint(reference, 2)}",
           "train.exit_at_step=6")
    _pass_over_batches(_checkpoint(reference, 6), batches=1, steps=1)
    launch("torchrun", reference, *common, f"train.resume={_checkpoint(reference, 6)}")

    anomalies = [r for r in _records(faulty) if "anomaly" in r]
    assert [(r["step"], r["anomaly"], r["action"]) for r in anomalies] == [
        (3, "nan", "skip"), (7, "spike", "skip")]
    assert anomalies[1]["loss"] > 3 * metrics(faulty, "loss")[6]
    assert "step 3: the loss is nan; skipped the step" in stdout
    assert "anomalies:   2 skipped (steps 3, 7)" in stdout

    losses, expected = metrics(faulty, "loss"), metrics(reference, "loss")
    assert sorted(expected) == [1, 2, 4, 5, 6, 8, 9]
    for step in expected:
        assert losses[step] == expected[step], (step, losses[step], expected[step])
    # The LR schedule stood still at the skipped steps, as it did at the passed-over batches.
    rates, expected_rates = metrics(faulty, "lr"), metrics(reference, "lr")
    assert {step: rates[step] for step in expected_rates} == expected_rates
    assert metrics(faulty, "val_loss")[STEPS] == metrics(reference, "val_loss")[STEPS]
    # DeepSpeed counts a withheld step as one it skipped itself.
    assert _deepspeed_counters(_checkpoint(faulty, STEPS)) == {
        "global_steps": STEPS, "skipped_steps": 2, "lr_schedule_steps": STEPS - 2}


def test_rollback_reloads_the_checkpoint_and_passes_over_the_batches_since(tmp_path):
    """NaN in batch 5 with checkpoints every 3 steps: back to step 3, then steps 4-9 train on
    batches 6-11. The reference resumes step 3's checkpoint, edited to continue at batch 6."""
    common = [f"train.max_steps={STEPS}", "parallel.zero_stage=2", "checkpoint.interval=3"]
    faulty, reference = tmp_path / "faulty", tmp_path / "reference"
    stdout = launch("torchrun", faulty, *common, "train.on_anomaly=rollback",
                    "train.inject_nan_at_batch=5")
    shutil.copytree(_checkpoint(faulty, 3), _checkpoint(reference, 3))
    _pass_over_batches(_checkpoint(reference, 3), batches=2, steps=0)
    launch("torchrun", reference, *common, f"train.resume={_checkpoint(reference, 3)}")

    records = _records(faulty)
    [anomaly] = [r for r in records if "anomaly" in r]
    assert (anomaly["step"], anomaly["anomaly"], anomaly["action"]) == (5, "nan", "rollback")
    assert f"rolling back to {_checkpoint(faulty, 3)}" in stdout
    assert "anomalies:   1 rolled back (step 5)" in stdout
    after = records[records.index(anomaly) + 1:]
    losses = {r["step"]: r["loss"] for r in after if "loss" in r}
    expected = metrics(reference, "loss")
    assert sorted(losses) == sorted(expected) == list(range(4, STEPS + 1))
    for step in expected:
        assert losses[step] == expected[step], (step, losses[step], expected[step])
    assert [r["val_loss"] for r in after if "val_loss" in r][-1] == \
        metrics(reference, "val_loss")[STEPS]
    state = json.loads((_checkpoint(faulty, STEPS) / STATE_FILE).read_text())["train_state"]
    assert state["consumed_samples"] == (STEPS + 2) * GLOBAL_BATCH


def test_stop_ends_the_run_naming_the_step_and_saves_nothing(tmp_path):
    command = pretrain_command("python", tmp_path, "train.max_steps=6", "checkpoint.interval=2",
                               "train.on_anomaly=stop", "train.inject_nan_at_batch=3")
    result = subprocess.run(command, cwd=REPO_ROOT, env=clean_env(), capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 3
    newest = _checkpoint(tmp_path, 2)
    assert (f"llmscale: error: step 3: the loss is nan; stopped without saving (a relaunch "
            f"resumes from {newest})") in result.stderr
    assert "Traceback" not in result.stderr
    assert [p.name for p in (tmp_path / "checkpoints").glob("step_*")] == [newest.name]
    assert [(r["step"], r.get("anomaly"), r.get("action")) for r in _records(tmp_path)
            if "loss" in r][-1] == (3, "nan", "stop")


def test_rollback_after_a_resume_on_another_layout(tmp_path):
    """A ZeRO-1 checkpoint resumed at ZeRO-2 goes through a universal conversion; the checkpoint
    the run saves after that, and rolls back to, is in the run's own layout again."""
    common = ["train.max_steps=7", "checkpoint.interval=2", "train.on_anomaly=rollback"]
    faulty, reference = tmp_path / "faulty", tmp_path / "reference"
    launch("python", faulty, *common, "parallel.zero_stage=1", "train.exit_at_step=2")
    stdout = launch("python", faulty, *common, "parallel.zero_stage=2",
                    "train.inject_nan_at_batch=5")
    assert "converting it to a universal checkpoint" in stdout
    assert f"rolling back to {_checkpoint(faulty, 4)}" in stdout
    shutil.copytree(_checkpoint(faulty, 4), _checkpoint(reference, 4))
    _pass_over_batches(_checkpoint(reference, 4), batches=1, steps=0)
    launch("python", reference, *common, "parallel.zero_stage=2",
           f"train.resume={_checkpoint(reference, 4)}")

    records = _records(faulty)
    [anomaly] = [r for r in records if "anomaly" in r]
    after = records[records.index(anomaly) + 1:]
    losses = {r["step"]: r["loss"] for r in after if "loss" in r}
    assert losses == metrics(reference, "loss")
    assert sorted(losses) == [5, 6, 7]
