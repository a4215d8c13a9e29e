"""Where metrics go: console, JSONL, TensorBoard and W&B, behind one small interface, for the
training loop and for results appended to a run later (`tools/evaluate.py --log-to-run`).

Sinks live on rank 0 only; the loop hands every one the same dict and never asks which. Values
are numbers, except the labels of an anomalous step's record ("anomaly": "nan", "action": "skip").
"""

import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Protocol, Union

from tqdm import tqdm

from llmscale.config.schema import LoggingConfig


Metrics = Dict[str, Union[float, str]]


class MetricSink(Protocol):
    def log(self, step: int, metrics: Metrics) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    def __init__(self, path: Path):
        self.file = path.open("a")

    def log(self, step: int, metrics: Metrics) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardSink:
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, metrics: Metrics) -> None:
        for name, value in metrics.items():
            if not isinstance(value, str):  # scalars only: an anomaly's labels stay in the JSONL
                self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, cfg: LoggingConfig, run_dir: Path, run_name: str, config: dict,
                 job_type: str = "train"):
        import wandb

        self.run = wandb.init(
            project=cfg.wandb_project, name=run_name, dir=str(run_dir), mode=cfg.wandb_mode,
            config=config, job_type=job_type,
        )

    def log(self, step: int, metrics: Metrics) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class ConsoleSink:
    """A progress bar with the latest loss, plus one line every `log_interval` steps and at
    every evaluation."""

    def __init__(self, total_steps: int, start_step: int, log_interval: int, progress_bar: bool):
        self.log_interval = log_interval
        self.bar: Optional[tqdm] = (
            tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
            # Redirected to a file, a bar's carriage returns would garble the log.
            if progress_bar and sys.stderr.isatty() else None
        )

    def log(self, step: int, metrics: Metrics) -> None:
        if self.bar is not None and "loss" in metrics:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
        if "val_loss" in metrics or step % self.log_interval == 0:
            line = f"step {step:>6} | " + " | ".join(
                f"{name} {_format(value)}" for name, value in metrics.items()
            )
            (self.bar.write if self.bar is not None else print)(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _format(value: Union[float, str]) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def build_sinks(
    cfg: LoggingConfig, run_dir: Path, run_name: str, config: dict, total_steps: int,
    start_step: int, log_interval: int,
) -> List[MetricSink]:
    return [ConsoleSink(total_steps, start_step, log_interval, cfg.progress_bar),
            *run_records(cfg, run_dir, run_name, config)]


def run_records(cfg: LoggingConfig, run_dir: Path, run_name: str, config: dict,
                job_type: str = "train") -> List[MetricSink]:
    """The run's lasting records that `cfg` turns on: `metrics.jsonl`, TensorBoard, W&B (a run
    of `job_type`: an evaluation appended later is a run of its own, in the same project)."""
    sinks: List[MetricSink] = []
    if cfg.jsonl:
        sinks.append(JsonlSink(run_dir / "metrics.jsonl"))
    if cfg.tensorboard:
        sinks.append(TensorBoardSink(run_dir / "tensorboard"))
    if cfg.wandb:
        sinks.append(WandbSink(cfg, run_dir, run_name, config, job_type))
    return sinks
