"""A step's metrics record, as the collectors build it (router metrics: tests/models/test_moe.py)."""

import torch
from torch import nn

from llmscale.config.schema import AnomalyPolicy
from llmscale.train.anomaly import Anomaly
from llmscale.train.step_metrics import FinishedStep, collect, step_collectors
from llmscale.train.throughput import ThroughputMeter


class Engine:
    def __init__(self, grad_norm):
        self.grad_norm = grad_norm

    def get_global_grad_norm(self):
        return self.grad_norm


def record(engine: Engine, anomaly=None) -> dict:
    collectors = step_collectors(engine, nn.Linear(2, 2), ThroughputMeter(1e6, 2, 1.0),
                                 torch.device("cpu"))
    return collect(collectors, FinishedStep(loss=2.5, lr=1e-3, seconds=0.5, tokens=1000,
                                            consumed_tokens=7000, anomaly=anomaly))


def test_a_sound_step_logs_loss_rate_and_throughput_in_order() -> None:
    metrics = record(Engine(grad_norm=0.75))
    assert metrics == {
        "loss": 2.5, "lr": 1e-3, "grad_norm": 0.75, "consumed_tokens": 7000,
        "tokens_per_s": 2000.0, "tflops_per_device": 1e-3, "mfu": 1e-3,
    }
    assert list(metrics) == [
        "loss", "lr", "grad_norm", "consumed_tokens", "tokens_per_s", "tflops_per_device", "mfu"]


def test_an_anomaly_and_a_missing_grad_norm_are_recorded() -> None:
    anomaly = Anomaly(3, "nan", AnomalyPolicy.skip, "the loss is nan", None)
    metrics = record(Engine(grad_norm=None), anomaly)
    assert metrics["grad_norm"] == 0.0
    assert (metrics["anomaly"], metrics["action"]) == ("nan", "skip")
