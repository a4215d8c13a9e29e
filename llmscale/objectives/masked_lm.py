"""BERT's input corruption for masked-LM training (Devlin et al. 2019, section 3.1).

Each ordinary token is chosen with probability `rate` (15%); of the chosen, 80% become the
mask token, 10% a random ordinary token and 10% stay as they are, so the encoder cannot learn
that only mask tokens need predicting. The loss is on the chosen positions only: the labels
hold their original ids and IGNORE_INDEX elsewhere. Special ids (end of document, padding, the
mask token itself) are never chosen, and random replacements are drawn from the ordinary ids
only, so no document boundary appears or vanishes. Every draw comes from the caller's seeded
generator, so a step's masks depend on the seed alone.
"""

from typing import List, Sequence, Tuple

import torch

from llmscale.models.fused_loss import IGNORE_INDEX

REPLACE_BY_MASK = 0.8
# Of the chosen tokens not replaced by the mask token, this share gets a random token (BERT's
# 10% of all chosen); the rest stay unchanged.
RANDOM_OF_THE_REST = 0.5


def mask_tokens(ids: torch.Tensor, mask_id: int, vocab_size: int, special_ids: Sequence[int],
                generator: torch.Generator, rate: float = 0.15,
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) for token ids [B, S] of a vocabulary of `vocab_size` ids (the
    tokenizer's, not the padded embedding's)."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"the mask rate must lie in (0, 1), got {rate}")
    never = torch.tensor(sorted({mask_id, *special_ids}), dtype=ids.dtype, device=ids.device)
    ordinary = torch.ones(vocab_size, dtype=torch.bool, device=ids.device)
    ordinary[never[never < vocab_size]] = False
    ordinary_ids = ordinary.nonzero().squeeze(1).to(ids.dtype)

    def uniform() -> torch.Tensor:
        return torch.rand(ids.shape, generator=generator, device=ids.device)

    chosen = (uniform() < rate) & ~torch.isin(ids, never)
    by_mask = chosen & (uniform() < REPLACE_BY_MASK)
    by_random = chosen & ~by_mask & (uniform() < RANDOM_OF_THE_REST)
    random_ids = ordinary_ids[torch.randint(len(ordinary_ids), ids.shape, generator=generator,
                                            device=ids.device)]
    inputs = torch.where(by_mask, torch.full_like(ids, mask_id), ids)
    inputs = torch.where(by_random, random_ids, inputs)
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    return inputs, labels


Batch = Tuple[torch.Tensor, torch.Tensor]


class MaskedLMBatches:
    """Turns next-token micro-batches into masked-LM ones: the inputs are corrupted as above,
    the labels are the originals at the chosen positions, and the shifted next-token labels are
    dropped. Each sample's draws come from a generator seeded by `seed` and the sample's position
    in the global order (`llmscale.data.sampler.micro_batch_positions`), so its masks are the
    same for any data-parallel size, micro-batch size or resume point, and differ between epochs
    (RoBERTa's dynamic masking)."""

    def __init__(self, mask_id: int, vocab_size: int, special_ids: Sequence[int], seed: int,
                 rate: float) -> None:
        self.mask_id, self.vocab_size, self.special_ids = mask_id, vocab_size, special_ids
        self.seed, self.rate = seed, rate

    def __call__(self, batches: List[Batch], positions: List[Sequence[int]]) -> List[Batch]:
        return [self._mask(ids, batch_positions)
                for (ids, _), batch_positions in zip(batches, positions, strict=True)]

    def _mask(self, ids: torch.Tensor, positions: Sequence[int]) -> Batch:
        rows = [mask_tokens(row, self.mask_id, self.vocab_size, self.special_ids,
                            torch.Generator().manual_seed(self.seed * 1_000_003 + position),
                            self.rate)
                for row, position in zip(ids, positions, strict=True)]
        inputs, labels = zip(*rows)
        return torch.stack(inputs), torch.stack(labels)
