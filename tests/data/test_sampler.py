import pytest
import torch

from llmscale.data import GlobalSampleOrder, PackedDataset, rank_micro_batches

SEQ_LEN = 4
NUM_SAMPLES = 20


def make_dataset(num_samples: int = NUM_SAMPLES) -> PackedDataset:
    return PackedDataset(torch.arange(num_samples * SEQ_LEN + 1), seq_len=SEQ_LEN)


def sample_ids(input_ids: torch.Tensor) -> list[int]:
    """Dataset indices of a batch: sample i of `make_dataset` starts at token i * SEQ_LEN."""
    return (input_ids[:, 0] // SEQ_LEN).tolist()


def epoch_order(order: GlobalSampleOrder, epoch: int) -> list[int]:
    n = order.num_samples
    return [order.dataset_index(epoch * n + i) for i in range(n)]


def test_each_epoch_is_a_fresh_permutation() -> None:
    order = GlobalSampleOrder(NUM_SAMPLES, seed=7)
    epochs = [epoch_order(order, epoch) for epoch in range(3)]
    for visited in epochs:
        assert sorted(visited) == list(range(NUM_SAMPLES))
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs[0] != list(range(NUM_SAMPLES))


def test_order_depends_only_on_seed_and_index() -> None:
    order = GlobalSampleOrder(NUM_SAMPLES, seed=7)
    forward = [order.dataset_index(g) for g in range(3 * NUM_SAMPLES)]
    # Jumping back and forth across epochs must not disturb the cached permutation.
    backward = [order.dataset_index(g) for g in reversed(range(3 * NUM_SAMPLES))][::-1]
    fresh = [GlobalSampleOrder(NUM_SAMPLES, 7).dataset_index(g) for g in range(3 * NUM_SAMPLES)]
    assert forward == backward == fresh
    assert epoch_order(GlobalSampleOrder(NUM_SAMPLES, seed=8), 0) != forward[:NUM_SAMPLES]


def test_unshuffled_order_is_identity() -> None:
    order = GlobalSampleOrder(NUM_SAMPLES, seed=7, shuffle=False)
    assert [order.dataset_index(g) for g in range(2 * NUM_SAMPLES + 3)] == [
        g % NUM_SAMPLES for g in range(2 * NUM_SAMPLES + 3)
    ]


def global_batch(
    consumed: int, micro_batch_size: int, grad_accum_steps: int, dp_size: int
) -> list[list[int]]:
    """Per rank, the dataset indices of its micro-batches, in order, for one optimizer step."""
    dataset = make_dataset()
    order = GlobalSampleOrder(NUM_SAMPLES, seed=3)
    per_rank = []
    for rank in range(dp_size):
        batches = rank_micro_batches(
            dataset, order, consumed, micro_batch_size, grad_accum_steps, rank, dp_size
        )
        assert len(batches) == grad_accum_steps
        for input_ids, labels in batches:
            assert input_ids.shape == labels.shape == (micro_batch_size, SEQ_LEN)
            assert torch.equal(input_ids[:, 1:], labels[:, :-1])
        per_rank.append([i for input_ids, _ in batches for i in sample_ids(input_ids)])
    return per_rank


@pytest.mark.parametrize("consumed", [0, 16, 36])
def test_global_batch_does_not_depend_on_dp_size(consumed: int) -> None:
    order = GlobalSampleOrder(NUM_SAMPLES, seed=3)
    expected = sorted(order.dataset_index(consumed + k) for k in range(8))
    layouts = [(2, 4, 1), (2, 2, 2), (2, 1, 4), (8, 1, 1), (1, 2, 4)]
    for micro_batch_size, grad_accum_steps, dp_size in layouts:
        per_rank = global_batch(consumed, micro_batch_size, grad_accum_steps, dp_size)
        assert sorted(i for rank in per_rank for i in rank) == expected


def test_ranks_take_interleaved_slices_of_each_accumulation_step() -> None:
    order = GlobalSampleOrder(NUM_SAMPLES, seed=3)
    g = [order.dataset_index(k) for k in range(8)]
    assert global_batch(0, micro_batch_size=2, grad_accum_steps=2, dp_size=2) == [
        [g[0], g[1], g[4], g[5]],
        [g[2], g[3], g[6], g[7]],
    ]


def test_resume_continues_the_uninterrupted_order() -> None:
    dataset = make_dataset()
    global_batch_size = 6  # does not divide NUM_SAMPLES, so steps straddle epochs

    def steps(first_step: int, num_steps: int) -> list[torch.Tensor]:
        order = GlobalSampleOrder(NUM_SAMPLES, seed=11)
        batches = []
        for step in range(first_step, first_step + num_steps):
            batches += rank_micro_batches(dataset, order, step * global_batch_size, 3, 2, 0, 1)
        return [input_ids for input_ids, _ in batches]

    uninterrupted = steps(0, 10)
    resumed = steps(4, 6)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted[8:], resumed, strict=True))


def test_bad_rank_or_mismatched_order_is_rejected() -> None:
    dataset = make_dataset()
    with pytest.raises(ValueError, match="dp_rank"):
        rank_micro_batches(dataset, GlobalSampleOrder(NUM_SAMPLES, 0), 0, 2, 1, 2, 2)
    with pytest.raises(ValueError, match="GlobalSampleOrder"):
        rank_micro_batches(dataset, GlobalSampleOrder(NUM_SAMPLES + 1, 0), 0, 2, 1, 0, 1)
