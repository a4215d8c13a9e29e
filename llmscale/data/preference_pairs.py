"""Preference pairs (objective=dpo) from a prepared pairs folder (`tools/prepare_sft.py --pairs`):
`chosen` and `rejected` token datasets with their loss-mask twins, pair i being document i of
each.

A sample is one whole pair: input ids and labels [2, seq_len], row 0 the chosen conversation and
row 1 the rejected one, each made as a chat sample of one example (`ChatSamples`: padded to the
window, labels only on the response's tokens), and the pair's index in the folder, which finds
its reference log-probs. A micro-batch of N samples is then N pairs, 2N sequences, and the
halves of a pair can never fall into different micro-batches or ranks.

Train and validation split the pairs as chat data splits its examples: the last `val_fraction`
(at least one) are held out.
"""

from pathlib import Path
from typing import Tuple

import torch
from torch import Tensor

from llmscale.data.chat_samples import (
    ChatSamples, check_prepared_tokenizer, open_masked_datasets, prepared_folder, training_end,
)
from llmscale.data.tokenizer import Tokenizer

# The datasets of a pairs folder, in the order of a sample's rows.
PAIR_SIDES = ("chosen", "rejected")


class PreferencePairs:
    """(input_ids[2, S], labels[2, S], pair index) samples of the pairs [first, end)."""

    def __init__(self, sides: Tuple[ChatSamples, ChatSamples], name: str) -> None:
        self.sides = sides
        self.name = name

    def __len__(self) -> int:
        return len(self.sides[0])

    def __getitem__(self, index: int) -> Tuple[Tensor, Tensor, Tensor]:
        rows = [side[index] for side in self.sides]
        pair = self.sides[0].groups[index][0]
        return (torch.stack([inputs for inputs, _ in rows]),
                torch.stack([labels for _, labels in rows]),
                torch.tensor(pair, dtype=torch.int64))

    def describe(self) -> str:
        chosen, rejected = (side.split for side in self.sides)
        return (f"{self.name} {len(self)} pairs, {chosen.truncated} chosen and "
                f"{rejected.truncated} rejected responses cut at data.seq_len "
                f"({chosen.supervised_tokens_cut + rejected.supervised_tokens_cut} response "
                "tokens lost)")


def build_pair_datasets(folder: str, seq_len: int, val_fraction: float, tokenizer: Tokenizer,
                        root: Path) -> Tuple[PreferencePairs, PreferencePairs]:
    """The train and validation pairs of the prepared pairs folder `folder` (relative paths
    resolve against `root`), read as ids of `tokenizer`."""
    path = prepared_folder(folder, root)
    setting = f"data.pairs={folder}"
    prepare = (f"python tools/prepare_sft.py --pairs --input PAIRS.jsonl --tokenizer TOKENIZER "
               f"--output {folder}")
    datasets = [open_masked_datasets(path / side, setting, "pairs folder", prepare)
                for side in PAIR_SIDES]
    check_prepared_tokenizer(path, "data.pairs", tokenizer)
    count = len(datasets[0][0])
    train_end = training_end(count, val_fraction, setting, "pairs")

    def split(first: int, end: int, name: str) -> PreferencePairs:
        groups = [(pair, pair + 1) for pair in range(first, end)]
        return PreferencePairs(tuple(
            ChatSamples(tokens, masks, groups, seq_len, tokenizer.eod_id, f"{side} {name}")
            for side, (tokens, masks) in zip(PAIR_SIDES, datasets)), name)

    return split(0, train_end, "training split"), split(train_end, count, "validation split")
