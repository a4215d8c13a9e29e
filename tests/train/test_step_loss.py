"""The fine-tuning step's loss: the mean over every target of the global batch, whatever its
split into data-parallel ranks and accumulation steps, however unevenly the targets fall.

The ranks are simulated in this process with DeepSpeed's two reductions (each micro-batch's
loss divided by the accumulation steps before its backward, gradients averaged over the
data-parallel ranks); the 2-rank runs of tests/train/test_sft_runs.py check them for real.
"""

from typing import List, Tuple

import pytest
import torch
import torch.nn.functional as F

from llmscale.config.schema import ModelConfig
from llmscale.data import GlobalSampleOrder, rank_micro_batches
from llmscale.models import Llama
from llmscale.models.fused_loss import IGNORE_INDEX
from llmscale.parallel.token_mean import loss_denominator, target_count

VOCAB, SEQ = 48, 12
# Targets per sample: uneven, and one sample has none.
TARGETS = [12, 2, 0, 7]


def tiny_model() -> Llama:
    torch.manual_seed(0)
    cfg = ModelConfig(name="t", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=64, vocab_size=VOCAB, max_seq_len=SEQ)
    return Llama(cfg)


def global_batch() -> List[Tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    samples = []
    for count in TARGETS:
        inputs = torch.randint(VOCAB, (SEQ,), generator=generator)
        labels = torch.randint(VOCAB, (SEQ,), generator=generator)
        labels[: SEQ - count] = IGNORE_INDEX  # targets at the end, as a response follows its prompt
        samples.append((inputs, labels))
    return samples


def simulated_step(model: Llama, dp: int, grad_accum_steps: int, global_token_mean: bool = True):
    """The logged loss and the gradient of one step over the global batch, split into `dp`
    ranks of `grad_accum_steps` micro-batches, reduced as DeepSpeed and `train_step` do."""
    samples = global_batch()
    micro_batch = len(samples) // (dp * grad_accum_steps)
    order = GlobalSampleOrder(len(samples), seed=0, shuffle=False)
    ranks = [rank_micro_batches(samples, order, 0, micro_batch, grad_accum_steps, rank, dp)
             for rank in range(dp)]
    denominator = None
    if global_token_mean:  # train_step's all-reduce sums the ranks' counts
        global_count = sum(target_count(batches) for batches in ranks)
        denominator = loss_denominator(global_count, dp, grad_accum_steps)
    gradients = [torch.zeros_like(p) for p in model.parameters()]
    rank_losses = []
    for batches in ranks:
        model.zero_grad()
        losses = []
        for inputs, labels in batches:
            loss = model(inputs, labels, denominator)
            (loss / grad_accum_steps).backward()  # DeepSpeed's engine.backward
            losses.append(loss.detach())
        for total, param in zip(gradients, model.parameters()):
            total += param.grad / dp  # DeepSpeed's data-parallel average
        rank_losses.append(torch.stack(losses).mean())
    return torch.stack(rank_losses).mean().item(), gradients


def direct_step(model: Llama):
    """The whole global batch at once: summed token losses over its targets."""
    inputs, labels = (torch.stack(t) for t in zip(*global_batch()))
    model.zero_grad()
    logits = model(inputs)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


def assert_same_step(step, expected) -> None:
    (loss, gradients), (expected_loss, expected_gradients) = step, expected
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    for gradient, expected_gradient in zip(gradients, expected_gradients):
        torch.testing.assert_close(gradient, expected_gradient, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("dp", "grad_accum_steps"), [(1, 4), (2, 2), (4, 1), (1, 1)])
def test_every_split_of_the_global_batch_gives_the_global_token_mean(dp, grad_accum_steps):
    model = tiny_model()
    assert_same_step(simulated_step(model, dp, grad_accum_steps), direct_step(model))


def test_the_per_micro_batch_mean_would_weigh_the_targets_unevenly():
    """The pretraining loss (each micro-batch averaged over its own targets) differs here, so
    the test above can tell the two apart."""
    model = tiny_model()
    per_micro_batch, _ = simulated_step(model, 1, 4, global_token_mean=False)
    assert per_micro_batch != pytest.approx(direct_step(model)[0], rel=1e-3)


def test_the_denominator_undoes_deepspeeds_reductions():
    assert loss_denominator(torch.tensor(21), dp=2, micro_batches=2).item() == 21 / 4
    assert loss_denominator(torch.tensor(0), dp=1, micro_batches=1).item() == 1.0
    assert loss_denominator(torch.tensor(3), 1, 1).dtype == torch.float32


def test_without_a_denominator_the_loss_is_unchanged():
    """Pretraining passes none: the loss is the micro-batch's own mean, as before."""
    model = tiny_model()
    inputs, labels = (torch.stack(t) for t in zip(*global_batch()))
    hidden = model.model(inputs)
    token_losses = model.token_losses(model.lm_head(hidden), labels.t())
    expected = token_losses.sum() / (labels != IGNORE_INDEX).sum()
    assert torch.equal(model.loss(hidden, labels), expected)
    assert torch.equal(model.loss(hidden, labels, torch.tensor(5.0)), token_losses.sum() / 5.0)


def test_the_fused_loss_honours_the_denominator():
    model = tiny_model()
    inputs, labels = (torch.stack(t) for t in zip(*global_batch()))
    plain = model(inputs, labels, torch.tensor(7.0))
    model.use_fused_loss()
    torch.testing.assert_close(model(inputs, labels, torch.tensor(7.0)), plain)
