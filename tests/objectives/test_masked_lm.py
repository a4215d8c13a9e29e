"""BERT's masking: the rates over 100k tokens, the labels, specials never chosen, random
replacements ordinary, and the same masks for the same seed."""

import pytest
import torch

from llmscale.data.sampler import micro_batch_positions
from llmscale.objectives.masked_lm import IGNORE_INDEX, MaskedLMBatches, mask_tokens

VOCAB, MASK, EOD, PAD = 1000, 999, 998, 0


def corpus(seed: int = 0) -> torch.Tensor:
    """[50, 2000] ids: ordinary tokens with an end of document every 100 and padding at the end
    of each row."""
    ids = torch.randint(1, EOD, (50, 2000), generator=torch.Generator().manual_seed(seed))
    ids[:, 99::100] = EOD
    ids[:, -150:] = PAD
    return ids


def masked(seed: int, ids: torch.Tensor):
    return mask_tokens(ids, MASK, VOCAB, [EOD, PAD], torch.Generator().manual_seed(seed))


def test_rates_are_berts_within_one_percent_over_100k_tokens():
    ids = corpus()
    inputs, labels = masked(1, ids)
    ordinary = (ids != EOD) & (ids != PAD)
    chosen = labels != IGNORE_INDEX
    assert ids.numel() == 100_000
    assert abs(chosen.sum() / ordinary.sum() - 0.15) < 0.01
    shares = {"mask": (inputs[chosen] == MASK).float().mean().item(),
              # A random draw equal to the original (1 in 997) counts as unchanged here.
              "random": ((inputs != ids) & (inputs != MASK))[chosen].float().mean().item(),
              "unchanged": (inputs == ids)[chosen].float().mean().item()}
    assert abs(shares["mask"] - 0.8) < 0.01, shares
    assert abs(shares["random"] - 0.1) < 0.01, shares
    assert abs(shares["unchanged"] - 0.1) < 0.01, shares
    # Labels are the original ids where chosen; positions not chosen keep their input.
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen])


def test_specials_are_never_chosen_and_random_tokens_are_ordinary():
    ids = corpus()
    inputs, labels = masked(2, ids)
    special = (ids == EOD) | (ids == PAD)
    assert (labels[special] == IGNORE_INDEX).all() and torch.equal(inputs[special], ids[special])
    replaced = inputs[(inputs != ids) & (inputs != MASK)]
    assert len(replaced) > 1000
    assert not torch.isin(replaced, torch.tensor([EOD, PAD, MASK])).any()


def test_the_same_seed_gives_the_same_masks_and_another_seed_others():
    ids = corpus()
    first, again, other = masked(7, ids), masked(7, ids), masked(8, ids)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[1], other[1])


def test_a_rate_outside_0_1_is_refused():
    with pytest.raises(ValueError, match="mask rate must lie in"):
        mask_tokens(corpus()[:1], MASK, VOCAB, [EOD], torch.Generator(), rate=1.5)


def test_a_samples_masks_depend_on_its_position_not_on_the_layout():
    """One global batch of 8 samples as 1 rank x 4 micro-batches of 2, and as 2 ranks x 1
    micro-batch of 4: each sample gets the same inputs and labels."""
    samples = corpus()[:8, :64]
    masked_lm = MaskedLMBatches(MASK, VOCAB, [EOD, PAD], seed=3, rate=0.15)

    def by_sample(micro_batch_size, accumulation, ranks):
        found = {}
        for rank in range(ranks):
            positions = micro_batch_positions(8, micro_batch_size, accumulation, rank, ranks)
            batches = [(samples[[p - 8 for p in batch]], None) for batch in positions]
            for batch, (inputs, labels) in zip(positions, masked_lm(batches, positions)):
                found.update({p: (inputs[i], labels[i]) for i, p in enumerate(batch)})
        return found

    one_rank, two_ranks = by_sample(2, 4, 1), by_sample(4, 1, 2)
    assert sorted(one_rank) == sorted(two_ranks) == list(range(8, 16))
    for position in one_rank:
        assert all(torch.equal(a, b) for a, b in zip(one_rank[position], two_ranks[position]))
    # Another epoch (position) of the same sample draws other masks.
    again = masked_lm([(samples[:1], None)], [[16]])[0]
    assert not torch.equal(again[1][0], one_rank[8][1])
