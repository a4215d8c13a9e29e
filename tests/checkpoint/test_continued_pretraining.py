"""A run exported to Hugging Face format and imported back starts a new run from exactly the
weights the first one ended with."""

import subprocess
import sys

import pytest
from launching import REPO_ROOT, launch, metrics

pytestmark = pytest.mark.slow


def _convert(*args: str) -> None:
    subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "convert_checkpoint.py"), *args],
                   check=True, cwd=REPO_ROOT, capture_output=True)


def test_init_from_imported_weights_continues_where_the_source_run_ended(tmp_path):
    source, continued = tmp_path / "source", tmp_path / "continued"
    launch("python", source, "train.max_steps=20", "checkpoint.interval=0")
    _convert("to-hf", str(source), str(tmp_path / "hf"))
    _convert("from-hf", str(tmp_path / "hf"), str(tmp_path / "weights"))

    stdout = launch("python", continued, "train.max_steps=20", "checkpoint.interval=0",
                    f"train.init_from={tmp_path / 'weights'}", "optim.warmup_steps=5")
    source_val, continued_val = metrics(source, "val_loss"), metrics(continued, "val_loss")
    assert continued_val[0] == source_val[20]
    # A fresh optimizer and a re-warmed LR: the first step runs at lr / warmup_steps.
    assert metrics(continued, "lr")[1] == pytest.approx(3e-3 / 5)
    assert continued_val[20] < continued_val[0]
    assert "resuming" not in stdout
