"""A stopped adapter run resumes only on the frozen base its adapters were trained on: its
checkpoint records the base's fingerprint, and a resume whose train.init_from holds other
weights (the same model settings) is refused before any process group starts, naming it."""

import subprocess

import pytest
import torch
from launching import REPO_ROOT, clean_env, launch, metrics, pretrain_command
from test_qlora_runs import MODEL

from llmscale.checkpoint.checkpointer import STATE_FILE, find_latest_checkpoint
from llmscale.checkpoint.hf import save_weights
from llmscale.models import Llama

pytestmark = pytest.mark.slow

SETTINGS = ["adapter=qlora", "adapter.dropout=0",
            f"model.intermediate_size={MODEL.intermediate_size}",
            "train.max_steps=2", "checkpoint.interval=0", "train.eval_batches=1"]


def test_a_resume_on_another_base_is_refused(tmp_path):
    bases = []
    for seed in (7, 8):
        torch.manual_seed(seed)
        bases.append(save_weights(Llama(MODEL).state_dict(), MODEL, tmp_path / f"base{seed}"))
    run = tmp_path / "run"
    launch("python", run, *SETTINGS, f"train.init_from={bases[0]}", "train.exit_at_step=1")
    step_dir = find_latest_checkpoint(run / "checkpoints")
    assert '"frozen_base": "sha256 ' in (step_dir / STATE_FILE).read_text()
    resume = subprocess.run(
        pretrain_command("python", run, *SETTINGS, f"train.init_from={bases[1]}"),
        cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True, timeout=900)
    assert resume.returncode == 2, resume.stdout[-3000:] + resume.stderr[-3000:]
    assert f"llmscale: error: checkpoint {step_dir} holds adapters trained on another frozen " \
        "base" in resume.stderr and f"train.init_from={bases[1]}" in resume.stderr
    assert "Traceback" not in resume.stderr
    # The base it trained on, in another folder: the same weights, so it resumes.
    moved = bases[0].rename(tmp_path / "moved")
    assert "resuming from" in launch("python", run, *SETTINGS, f"train.init_from={moved}")
    assert sorted(metrics(run, "loss")) == [1, 2]
