"""No load path unpickles code: a checkpoint file carrying an object whose unpickling would run
a function is refused with one message naming the file, at resume as in a direct load."""

import subprocess
from pathlib import Path

import pytest
import torch
from launching import REPO_ROOT, clean_env, launch, pretrain_command

from llmscale.checkpoint.checkpointer import step_dir_name
from llmscale.checkpoint.manifest import MANIFEST_FILE, write_manifest
from llmscale.checkpoint.safe_load import weights_only_loads
from llmscale.config.load import ConfigError


class Payload:
    """Unpickling it calls `open(marker, "w")`: any function could stand in its place."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def plant_payload(path: Path, marker: Path) -> None:
    """Add the payload to a DeepSpeed file, and re-list the folder so its manifest accepts it."""
    state = torch.load(path, weights_only=False)
    state["payload"] = Payload(marker)
    torch.save(state, path)
    (path.parent / MANIFEST_FILE).unlink()
    write_manifest(path.parent)


def test_deepspeeds_own_unsafe_loads_are_refused_naming_the_file(tmp_path):
    step_dir, marker = tmp_path / "step", tmp_path / "code_ran"
    step_dir.mkdir()
    torch.save({"weight": torch.ones(2)}, step_dir / "clean.pt")
    torch.save({"weight": torch.ones(2), "payload": Payload(marker)}, step_dir / "planted.pt")
    with weights_only_loads(step_dir):
        assert torch.load(step_dir / "clean.pt", weights_only=False)["weight"].sum() == 2
    with pytest.raises(ConfigError, match=r"was not loaded: planted.pt names io.open\. "):
        with weights_only_loads(step_dir):
            torch.load(step_dir / "planted.pt", weights_only=False)  # as DeepSpeed calls it
    assert not marker.exists()


@pytest.mark.slow
def test_resume_refuses_a_planted_object_with_a_clear_message(tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "code_ran"
    common = ["train.max_steps=4", "checkpoint.interval=2"]
    launch("python", run_dir, *common, "train.exit_at_step=2")
    step_dir = run_dir / "checkpoints" / step_dir_name(2)
    plant_payload(step_dir / "mp_rank_00_model_states.pt", marker)

    result = subprocess.run(pretrain_command("python", run_dir, *common), cwd=REPO_ROOT,
                            env=clean_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 2, result.stderr[-3000:]
    assert (f"llmscale: error: checkpoint {step_dir} was not loaded: mp_rank_00_model_states.pt "
            "names io.open. Unpickling such objects could run code") in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()
