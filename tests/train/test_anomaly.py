"""How a step's loss is checked, what each outcome makes the run do, and the pieces that carry it
out without DeepSpeed: the withheld update on a torch optimizer and LR schedule, the injected
faults, the metrics sinks and the config rules. Whole runs: test_anomaly_runs.py."""

import json
import math
from pathlib import Path
from typing import List

import pytest
import torch

from llmscale.config import ConfigError, load_config, validate
from llmscale.config.schema import AnomalyPolicy, ModelConfig, TrainConfig
from llmscale.models import Llama
from llmscale.tracking.sinks import ConsoleSink, JsonlSink, TensorBoardSink
from llmscale.train.anomaly import LossGuard, summarize, update_withheld
from llmscale.train.fault_injection import SPIKE, inject_loss_faults
from model_twins import shifted_batch

CHECKPOINT = Path("runs/x/checkpoints/step_00000040")


def guard(**overrides) -> LossGuard:
    return LossGuard(TrainConfig(**{"spike_window": 4, **overrides}))


def verdicts(g: LossGuard, losses: List[float]) -> List:
    return [g.check(step, loss, CHECKPOINT) for step, loss in enumerate(losses, start=1)]


@pytest.mark.parametrize("loss, kind", [(math.nan, "nan"), (math.inf, "inf"),
                                        (-math.inf, "inf")])
def test_a_non_finite_loss_is_an_anomaly_from_the_first_step(loss, kind):
    [anomaly] = verdicts(guard(), [loss])
    assert (anomaly.step, anomaly.kind, anomaly.action) == (1, kind, AnomalyPolicy.skip)
    assert anomaly.record() == {"anomaly": kind, "action": "skip"}
    assert anomaly.describe() == (f"step 1: the loss is {kind}; skipped the step: no update, "
                                  "and its batch is passed over")


def test_a_spike_is_measured_against_the_median_of_the_last_sound_steps():
    g = guard(spike_factor=2.0)
    # No spike before the window holds 4 sound losses, however high the loss.
    assert verdicts(g, [5.0, 100.0, 4.0, 3.0]) == [None] * 4
    # The window is now [5, 100, 4, 3]: median 4.5, threshold 9.
    spike = g.check(5, 9.01, CHECKPOINT)
    assert (spike.step, spike.kind) == (5, "spike")
    assert "the loss 9.01 spiked above train.spike_factor=2 x 4.5, the median of the last 4 " \
           "steps" in spike.describe()
    # The spike stays out of the window; a loss at the threshold is sound and enters it.
    assert g.check(6, 9.0, CHECKPOINT) is None
    # [100, 4, 3, 9]: median 6.5, threshold 13.
    assert g.check(7, 13.1, CHECKPOINT).kind == "spike"
    assert g.check(8, 13.0, CHECKPOINT) is None


def test_without_a_spike_factor_only_non_finite_losses_are_anomalies():
    g = guard(spike_factor=None)
    assert verdicts(g, [3.0, 3.0, 3.0, 3.0, 1e6]) == [None] * 5
    assert g.check(6, math.nan, CHECKPOINT).kind == "nan"


def test_rollback_names_its_checkpoint_and_falls_back_to_skip_without_one():
    g = guard(on_anomaly=AnomalyPolicy.rollback)
    skipped = g.check(1, math.nan, None)
    assert skipped.action is AnomalyPolicy.skip
    assert "no checkpoint exists yet" in skipped.describe()
    rolled = g.check(2, math.nan, CHECKPOINT)
    assert rolled.action is AnomalyPolicy.rollback
    assert f"rolling back to {CHECKPOINT}" in rolled.describe()


def test_stop_names_the_step_and_the_checkpoint_a_relaunch_resumes_from():
    g = guard(on_anomaly=AnomalyPolicy.stop)
    assert g.check(41, math.inf, CHECKPOINT).describe() == (
        f"step 41: the loss is inf; stopped without saving (a relaunch resumes from {CHECKPOINT})."
        " train.on_anomaly=skip or rollback trains past such steps")
    assert "no checkpoint has been saved" in g.check(1, math.nan, None).describe()


def test_one_anomaly_more_than_max_anomalies_between_saves_stops_the_run():
    # Sound steps in between do not reset the count: only a save does.
    actions = [a.action if a else None for a in verdicts(guard(max_anomalies=2),
                                                           [math.nan, 3.0, math.nan, math.nan])]
    assert actions == [AnomalyPolicy.skip, None, AnomalyPolicy.skip, AnomalyPolicy.stop]
    g = guard(max_anomalies=2)
    verdicts(g, [math.nan, math.nan])
    g.checkpoint_saved()
    assert g.check(3, math.nan, CHECKPOINT).action is AnomalyPolicy.skip
    assert g.check(4, math.nan, CHECKPOINT).action is AnomalyPolicy.skip
    stop = g.check(5, math.nan, CHECKPOINT)
    assert stop.action is AnomalyPolicy.stop
    assert stop.describe().startswith(
        "step 5: the loss is nan, 3 anomalies since the last checkpoint save, more than "
        "train.max_anomalies=2: the run is not recovering by itself; stopped without saving")


def test_summary_counts_each_action_with_its_steps():
    g = guard(on_anomaly=AnomalyPolicy.rollback)
    g.check(3, math.nan, None)
    g.check(7, math.inf, None)
    g.check(40, math.nan, CHECKPOINT)
    assert summarize(g.anomalies) == "2 skipped (steps 3, 7), 1 rolled back (step 40)"


class EngineLike:
    """DeepSpeed's contract at the last micro-batch: `step()` steps the optimizer it was given
    and the LR schedule (unless it found an overflow), then clears the gradients."""

    def __init__(self, skips_by_itself: bool = False):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, 2)
        self.basic_optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.1)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.basic_optimizer, lambda step: step + 1)
        self.skipped_steps = 0
        self.skips_by_itself = skips_by_itself  # an overflow DeepSpeed finds on its own

    def backward(self) -> None:
        self.model(torch.ones(3, 4)).sum().backward()

    def step(self) -> None:
        if self.skips_by_itself:
            self.skipped_steps += 1
        else:
            self.basic_optimizer.step()
            self.lr_scheduler.step()
        self.basic_optimizer.zero_grad()


def snapshot(engine: EngineLike):
    return ([p.detach().clone() for p in engine.model.parameters()],
            engine.basic_optimizer.param_groups[0]["lr"],
            {k: dict(v) for k, v in engine.basic_optimizer.state.items()})


def test_a_withheld_update_leaves_weights_moments_and_lr_and_counts_a_skip():
    engine = EngineLike()
    engine.backward()
    engine.step()  # one real update, so Adam has moments to keep
    before = snapshot(engine)
    engine.backward()
    with update_withheld(engine):
        engine.step()
    weights, lr, moments = snapshot(engine)
    assert all(torch.equal(a, b) for a, b in zip(weights, before[0]))
    assert lr == before[1]
    assert moments.keys() == before[2].keys()
    for param, state in moments.items():
        assert all(torch.equal(state[k], before[2][param][k]) for k in state)
    assert all(p.grad is None or not p.grad.any() for p in engine.model.parameters())
    assert engine.skipped_steps == 1

    engine.backward()
    engine.step()  # the optimizer and schedule move again, from where they stood
    assert not torch.equal(next(engine.model.parameters()), before[0][0])
    assert engine.basic_optimizer.param_groups[0]["lr"] == pytest.approx(0.3)
    assert engine.basic_optimizer.state[next(engine.model.parameters())]["step"] == 2


def test_a_step_deepspeed_skipped_by_itself_is_counted_once():
    engine = EngineLike(skips_by_itself=True)
    engine.backward()
    with update_withheld(engine):
        engine.step()
    assert engine.skipped_steps == 1


class LossModel(torch.nn.Module):
    def loss(self, x: torch.Tensor, labels, denominator=None, per_token=False) -> torch.Tensor:
        return (x * 2).mean()


@pytest.mark.parametrize("batch_fields, factor", [
    ({"inject_nan_at_batch": 3}, math.nan), ({"inject_spike_at_batch": 3}, SPIKE)])
def test_faults_hit_the_chosen_global_batch_in_training_only(batch_fields, factor):
    model, consumed = LossModel(), {"samples": 0}
    inject_loss_faults(model, TrainConfig(**batch_fields), 16, lambda: consumed["samples"])
    x = torch.ones(2, requires_grad=True)
    for samples, expected in [(0, 2.0), (16, 2.0), (32, 2.0 * factor), (48, 2.0)]:
        consumed["samples"] = samples
        loss = model.loss(x, None)
        assert loss.item() == pytest.approx(expected, nan_ok=True), samples
    consumed["samples"] = 32
    model.loss(x, None).backward()
    expected_grad = torch.full((2,), factor)  # d(2 * mean(x) * factor)/dx = factor
    assert torch.equal(x.grad, expected_grad) or (math.isnan(factor) and x.grad.isnan().all())
    with torch.no_grad():  # evaluation
        assert model.loss(x, None).item() == 2.0


@pytest.mark.parametrize("per_token", [False, True])
def test_the_model_forward_reaches_the_wrapped_loss_with_all_its_arguments(per_token):
    cfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
                      vocab_size=64, max_seq_len=16)
    torch.manual_seed(0)
    model = Llama(cfg)
    inputs, labels = shifted_batch(cfg)
    clean = model(inputs, labels, per_token=per_token)
    inject_loss_faults(model, TrainConfig(inject_spike_at_batch=1), 2, lambda: 0)
    assert torch.equal(model(inputs, labels, per_token=per_token), clean * SPIKE)


def test_without_a_fault_nothing_is_wrapped():
    model = LossModel()
    inject_loss_faults(model, TrainConfig(), 16, lambda: 0)
    assert "loss" not in vars(model)


def test_an_anomalous_step_record_reaches_every_sink(tmp_path, capsys):
    record = {"loss": math.nan, "grad_norm": math.inf, "anomaly": "nan", "action": "skip"}
    jsonl = JsonlSink(tmp_path / "metrics.jsonl")
    tensorboard = TensorBoardSink(tmp_path / "tb")
    for sink in (jsonl, tensorboard, ConsoleSink(10, 0, log_interval=1, progress_bar=False)):
        sink.log(3, record)
        sink.close()
    written = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert (written["anomaly"], written["action"], math.isnan(written["loss"])) == (
        "nan", "skip", True)
    assert "step      3 | loss nan | grad_norm inf | anomaly nan | action skip" in \
        capsys.readouterr().out


@pytest.mark.parametrize("overrides, message", [
    (["train.spike_factor=1.0"], "train.spike_factor=1.0 would call ordinary losses spikes"),
    (["train.on_anomaly=rollback", "checkpoint.interval=0"],
     "train.on_anomaly=rollback needs checkpoints to roll back to, but checkpoint.interval=0"),
    (["train.spike_window=0"], "train.spike_window=0 must be positive"),
    (["train.max_anomalies=0"], "train.max_anomalies=0 must be positive"),
    (["train.inject_nan_at_batch=0"], "train.inject_nan_at_batch=0 must be positive"),
])
def test_anomaly_settings_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError, match="invalid configuration") as caught:
        validate(load_config(["+exp=tiny", *overrides]), 1)
    assert message in str(caught.value)


def test_the_defaults_skip_nan_and_threefold_spikes():
    cfg = load_config(["+exp=tiny"])
    validate(cfg, 1)
    assert (cfg.train.on_anomaly, cfg.train.spike_factor, cfg.train.spike_window) == (
        AnomalyPolicy.skip, 3.0, 50)
    assert cfg.train.inject_nan_at_batch is None and cfg.train.inject_spike_at_batch is None
