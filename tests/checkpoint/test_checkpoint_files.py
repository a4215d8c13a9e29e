"""Which checkpoint a resume trusts: manifests, interrupted saves, damaged files, retention."""

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from llmscale.checkpoint.checkpointer import (
    STATE_FILE, Checkpointer, find_latest_checkpoint, resolve_resume, step_dir_name,
)
from llmscale.checkpoint.manifest import manifest_problem, write_manifest
from llmscale.checkpoint.reshard import check_reshardable, needs_universal
from llmscale.config.load import ConfigError
from llmscale.config.plan import ParallelPlan
from llmscale.config.schema import CheckpointConfig

PLAN = ParallelPlan(world_size=2, dp=2, tp=1, pp=1, zero_stage=2, micro_batch_size=8,
                    grad_accum_steps=1, global_batch_size=16)


def fake_checkpoint(checkpoint_dir: Path, step: int) -> Path:
    path = checkpoint_dir / step_dir_name(step)
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(bytes(range(256)) * 40)
    (path / STATE_FILE).write_text(json.dumps({"train_state": {"step": step}}))
    write_manifest(path)
    return path


def test_intact_checkpoint_passes_and_damage_is_named(tmp_path):
    path = fake_checkpoint(tmp_path, 10)
    assert manifest_problem(path, checksums=True) is None
    shard = path / "mp_rank_00_model_states.pt"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert manifest_problem(path, checksums=False) is None  # same size: only the checksum sees it
    assert "mp_rank_00_model_states.pt does not match its SHA-256" in manifest_problem(path, True)
    shard.write_bytes(bytes(data[:-10]))
    assert "has 10230 bytes, the manifest says 10240" in manifest_problem(path, False)
    shard.unlink()
    assert "mp_rank_00_model_states.pt is missing" in manifest_problem(path, False)
    (path / "manifest.json").unlink()
    assert "no manifest.json" in manifest_problem(path, False)


def test_auto_resume_takes_newest_intact_checkpoint_and_says_why_it_skipped(tmp_path, caplog):
    fake_checkpoint(tmp_path, 4)
    older = fake_checkpoint(tmp_path, 8)
    damaged = fake_checkpoint(tmp_path, 12)
    (damaged / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    interrupted = tmp_path / (step_dir_name(16) + ".partial")
    interrupted.mkdir()
    with caplog.at_level(logging.WARNING):
        assert resolve_resume("auto", tmp_path) == older
    assert f"skipping checkpoint {damaged}: mp_rank_00_model_states.pt has 9 bytes" in caplog.text
    assert f"ignoring {interrupted}: a save that was interrupted" in caplog.text


def test_auto_resume_of_a_new_run_starts_from_scratch(tmp_path):
    assert find_latest_checkpoint(tmp_path / "absent") is None
    assert resolve_resume("auto", tmp_path) is None
    assert resolve_resume("none", tmp_path) is None


def test_explicit_resume_paths_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="no such folder"):
        resolve_resume(str(tmp_path / "nope"), tmp_path)
    newest = fake_checkpoint(tmp_path, 5)
    with pytest.raises(ConfigError, match=f"is not an llmscale checkpoint.*the newest is {newest}"):
        resolve_resume(str(tmp_path), tmp_path)
    (newest / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="cannot be trusted: mp_rank_00_model_states.pt has 0"):
        resolve_resume(str(newest), tmp_path)


@pytest.mark.parametrize("keep_last, keep_every, kept", [
    (3, None, [8, 10, 12]),
    (2, 4, [4, 8, 10, 12]),
    (None, None, [2, 4, 6, 8, 10, 12]),
])
def test_retention_keeps_the_last_n_and_every_mth(tmp_path, keep_last, keep_every, kept):
    for step in range(2, 14, 2):
        newest = fake_checkpoint(tmp_path, step)
    cfg = CheckpointConfig(keep_last=keep_last, keep_every=keep_every)
    Checkpointer(cfg, tmp_path, rank=0, plan=PLAN, config_yaml="")._prune(newest)
    assert sorted(int(p.name.split("_")[1]) for p in tmp_path.iterdir()) == kept


@pytest.mark.parametrize("saved, running, universal", [
    ((2, 2), (1, 2), True), ((2, 2), (2, 1), True), ((2, 1), (4, 2), True),
    ((2, 2), (1, 3), True), ((2, 3), (1, 3), True), ((2, 3), (1, 1), True),
    ((2, 2), (2, 2), False), ((2, 0), (1, 0), False),
])
def test_layout_changes_that_go_through_a_universal_checkpoint(saved, running, universal):
    saved_plan = {"dp": saved[0], "zero_stage": saved[1], "tp": 1, "pp": 1}
    plan = replace(PLAN, dp=running[0], world_size=running[0], zero_stage=running[1])
    assert needs_universal(saved_plan, plan) == universal
    if universal:
        check_reshardable(Path("ckpt"), saved_plan, plan)


@pytest.mark.parametrize("saved_stage, running_stage", [(0, 1), (1, 0), (0, 3)])
def test_unsupported_layout_changes_are_refused_with_the_saved_layout(saved_stage, running_stage):
    saved_plan = {"dp": 2, "zero_stage": saved_stage, "tp": 1, "pp": 1}
    plan = replace(PLAN, dp=1, world_size=1, zero_stage=running_stage)
    with pytest.raises(ConfigError, match=rf"relaunch with the saved layout \(parallel.dp=2, "
                                          rf"parallel.tp=1, parallel.pp=1, "
                                          rf"parallel.zero_stage={saved_stage}\)"):
        check_reshardable(Path("ckpt"), saved_plan, plan)


@pytest.mark.parametrize("saved_tp, saved_pp", [(2, 1), (1, 2), (2, 2)])
def test_tensor_and_pipeline_size_changes_go_through_a_universal_checkpoint(saved_tp, saved_pp):
    saved_plan = {"dp": 1, "zero_stage": 1, "tp": saved_tp, "pp": saved_pp}
    plan = replace(PLAN, dp=1, world_size=1, zero_stage=1)
    assert needs_universal(saved_plan, plan)
    check_reshardable(Path("ckpt"), saved_plan, plan)


def test_expert_parallel_size_change_is_refused():
    saved_plan = {"dp": 2, "zero_stage": 1, "tp": 1, "pp": 1, "ep": 2}
    plan = replace(PLAN, dp=2, world_size=2, zero_stage=1, ep=1)
    with pytest.raises(ConfigError, match="saved with parallel.ep=2; this run has parallel.ep=1"):
        check_reshardable(Path("ckpt"), saved_plan, plan)
