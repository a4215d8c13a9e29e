"""Results of `tools/evaluate.py` appended to a training run's records (`--log-to-run`), under the
names its `train.evaluators` log: `eval/<name>/<metric>`, at the step of the checkpoint
evaluated, or at a step given."""

import json
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import OmegaConf

from llmscale.checkpoint.checkpointer import STATE_FILE
from llmscale.checkpoint.consolidate import saved_settings
from llmscale.config.schema import LoggingConfig
from llmscale.eval.tasks import run_metrics
from llmscale.tracking.sinks import run_records

RUN_CONFIG = "config.yaml"


def log_to_run(run_dir: Path, step: Optional[int], origin: Path, name: str,
               metrics: Dict[str, Any]) -> int:
    """Append `metrics` to the records `run_dir`'s logging settings keep (metrics.jsonl,
    TensorBoard, W&B when its package is installed); return the step logged at. `step` None:
    the step of the checkpoint `origin`."""
    run_dir = check_run(run_dir)
    if step is None:
        step = _checkpoint_step(origin)
    logging = saved_settings(run_dir, "logging", LoggingConfig, required=False)
    if logging.wandb and not _importable("wandb"):
        print(f"{run_dir} logs to W&B, but wandb is not installed here: results go to its "
              "other records only")
        logging.wandb = False
    run_name = OmegaConf.load(run_dir / RUN_CONFIG).get("name", run_dir.name)
    sinks = run_records(logging, run_dir, run_name, {"evaluated": str(origin)}, job_type="eval")
    for sink in sinks:
        sink.log(step, run_metrics(name, metrics))
        sink.close()
    return step


def check_run(run_dir: Path) -> Path:
    """`run_dir`, if it is a training run's folder."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_CONFIG).is_file():
        raise FileNotFoundError(f"--log-to-run {run_dir}: not a training run (it has no "
                                f"{RUN_CONFIG}); name the run's folder, train.run_dir")
    return run_dir


def _checkpoint_step(origin: Path) -> int:
    state = Path(origin) / STATE_FILE
    if not state.is_file():
        raise ValueError(f"--log-to-run needs --step: {origin} is not a training checkpoint, "
                         "whose step the results would be logged at")
    return int(json.loads(state.read_text())["train_state"]["step"])


def _importable(module: str) -> bool:
    from importlib.util import find_spec

    return find_spec(module) is not None
