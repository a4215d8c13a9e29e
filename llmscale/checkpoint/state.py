"""The loop's progress counters, which every checkpoint saves and a resume restores."""

from dataclasses import dataclass


@dataclass
class TrainState:
    """What the loop has done so far; saved with every checkpoint."""

    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
