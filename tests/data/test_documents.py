import pytest
import torch
from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

from llmscale.data import document_attention_mask, document_ids, document_position_ids

EOD = 0


def test_positions_restart_after_each_eod() -> None:
    tokens = torch.tensor([[5, 6, EOD, 7, 8, 9, EOD, EOD, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9]])
    assert document_position_ids(tokens, EOD).tolist() == [
        [0, 1, 2, 0, 1, 2, 3, 0, 0],
        [0, 1, 2, 3, 4, 5, 6, 7, 8],
    ]
    assert document_ids(tokens, EOD).tolist() == [
        [0, 0, 0, 1, 1, 1, 1, 2, 3],
        [0, 0, 0, 0, 0, 0, 0, 0, 0],
    ]


def test_mask_is_causal_within_documents() -> None:
    tokens = torch.tensor([4, EOD, 5, 6])
    assert document_attention_mask(tokens, EOD).int().tolist() == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 1, 0],
        [0, 0, 1, 1],
    ]


@pytest.mark.parametrize("seed", range(5))
def test_same_as_megatron_reset_position_ids_and_attention_mask(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 4, (24,), generator=generator)
    megatron_mask, _, megatron_positions = _get_ltor_masks_and_position_ids(
        tokens,
        EOD,
        reset_position_ids=True,
        reset_attention_mask=True,
        eod_mask_loss=False,
        create_attention_mask=True,
    )
    assert torch.equal(document_position_ids(tokens, EOD), megatron_positions)
    # megatron-core marks masked-out pairs True; llmscale marks allowed pairs True, as SDPA does.
    assert torch.equal(document_attention_mask(tokens, EOD), ~megatron_mask[0])
