"""Steps whose loss is not finite or spikes far above the recent losses, and the run's answer to
one (`train.on_anomaly`): the step's update is withheld, then the run skips on, rolls back to the
newest checkpoint, or stops.

Every rank checks the same all-reduced loss against the same history, so all ranks reach the
same decision without another collective."""

import math
import statistics
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Deque, Dict, Iterator, List, Optional, Tuple

from llmscale.checkpoint.checkpointer import Checkpointer, ResumeSource
from llmscale.checkpoint.state import TrainState
from llmscale.config.schema import AnomalyPolicy, TrainConfig


class TrainingStopped(Exception):
    """The run ended itself on an anomaly; the message names the step and why."""


@dataclass(frozen=True)
class Anomaly:
    step: int
    kind: str  # "nan", "inf" or "spike"
    action: AnomalyPolicy
    # What the loss was checked against, and why the action differs from the policy, if it does.
    explanation: str
    # The checkpoint a rollback loads; for a stop, the one a relaunch resumes from.
    checkpoint: Optional[Path]

    def record(self) -> Dict[str, str]:
        """The fields this adds to the step's metrics record."""
        return {"anomaly": self.kind, "action": self.action.value}

    def describe(self) -> str:
        what = f"step {self.step}: {self.explanation}"
        if self.action is AnomalyPolicy.skip:
            return f"{what}; skipped the step: no update, and its batch is passed over"
        if self.action is AnomalyPolicy.rollback:
            return (f"{what}; rolling back to {self.checkpoint} and going on after this step's "
                    "batch (the batches in between are passed over)")
        resume = (f"a relaunch resumes from {self.checkpoint}" if self.checkpoint
                  else "no checkpoint has been saved")
        return (f"{what}; stopped without saving ({resume}). train.on_anomaly=skip or rollback "
                "trains past such steps")


class LossGuard:
    """Checks each step's loss before its update and keeps the history a spike is measured
    against: the losses of the last `spike_window` steps that were not anomalies."""

    def __init__(self, cfg: TrainConfig):
        self.policy = cfg.on_anomaly
        self.spike_factor = cfg.spike_factor
        self.recent: Deque[float] = deque(maxlen=cfg.spike_window)
        self.max_anomalies = cfg.max_anomalies
        self.since_checkpoint = 0
        self.anomalies: List[Anomaly] = []

    def check(self, step: int, loss: float, newest_checkpoint: Optional[Path]) -> Optional[Anomaly]:
        """None for a sound loss; otherwise the anomaly and the action the run takes."""
        kind, explanation = self._anomaly_kind(loss)
        if kind is None:
            self.recent.append(loss)
            return None
        self.since_checkpoint += 1
        action = self.policy
        if self.since_checkpoint > self.max_anomalies:
            action = AnomalyPolicy.stop
            explanation += (f", {self.since_checkpoint} anomalies since the last checkpoint "
                            f"save, more than train.max_anomalies={self.max_anomalies}: the run "
                            "is not recovering by itself")
        elif action is AnomalyPolicy.rollback and newest_checkpoint is None:
            action = AnomalyPolicy.skip
            explanation += " (train.on_anomaly=rollback, but no checkpoint exists yet)"
        anomaly = Anomaly(step, kind, action, explanation, newest_checkpoint)
        self.anomalies.append(anomaly)
        return anomaly

    def checkpoint_saved(self) -> None:
        self.since_checkpoint = 0

    def _anomaly_kind(self, loss: float) -> Tuple[Optional[str], str]:
        """The anomaly's kind (None for a sound loss) and what the loss was checked against."""
        if math.isnan(loss):
            return "nan", "the loss is nan"
        if math.isinf(loss):
            return "inf", "the loss is inf"
        if self.spike_factor is None or len(self.recent) < self.recent.maxlen:
            return None, ""
        median = statistics.median(self.recent)
        if loss > self.spike_factor * median:
            return "spike", (f"the loss {loss:.4g} spiked above train.spike_factor="
                             f"{self.spike_factor:g} x {median:.4g}, the median of the last "
                             f"{len(self.recent)} steps")
        return None, ""


def _stand_still(*args, **kwargs) -> None:
    return None


@contextmanager
def update_withheld(engine) -> Iterator[None]:
    """Run DeepSpeed's `step()` as usual (gradient reduction, clipping, clearing the gradients)
    with the optimizer and the LR schedule standing still: the gradients are discarded, and the
    weights, the Adam moments and step count, and the learning rate stay as they were.

    DeepSpeed's counters then read as for a step it skips itself (on an overflow of the
    gradients, which it may also find here): `global_steps` counts the step, `skipped_steps`
    counts it as skipped, so their difference is the number of updates the LR schedule and
    Adam have seen."""
    held = [engine.basic_optimizer, engine.lr_scheduler]
    # torch's LR scheduler wraps the optimizer's `step` on the instance; keep whatever is there.
    own_steps = [vars(obj).get("step") for obj in held]
    skipped_before = engine.skipped_steps
    for obj in held:
        obj.step = _stand_still
    try:
        yield
    finally:
        for obj, own in zip(held, own_steps):
            if own is None:
                del obj.step
            else:
                obj.step = own
    if engine.skipped_steps == skipped_before:  # DeepSpeed's overflow check did not count it
        engine.skipped_steps += 1


def roll_back(engine, checkpointer: Checkpointer, source: ResumeSource, state: TrainState,
              seq_len: int) -> TrainState:
    """Reload the whole run (engine, RNG states, train state) from `source` and go on from the
    sample `state` has reached, passing over every batch after the checkpoint."""
    restored = checkpointer.load(engine, source)
    passed_over = state.consumed_samples - restored.consumed_samples
    restored.consumed_samples += passed_over
    restored.consumed_tokens += passed_over * seq_len
    return restored


def summarize(anomalies: List[Anomaly]) -> str:
    """'2 skipped (steps 7, 12), 1 rolled back (step 40)': a run that stopped prints no summary."""
    parts = []
    for action, verb in ((AnomalyPolicy.skip, "skipped"), (AnomalyPolicy.rollback, "rolled back")):
        steps = [str(a.step) for a in anomalies if a.action is action]
        if steps:
            label = "step" if len(steps) == 1 else "steps"
            parts.append(f"{len(steps)} {verb} ({label} {', '.join(steps)})")
    return ", ".join(parts)
