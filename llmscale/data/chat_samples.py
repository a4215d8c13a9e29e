"""Supervised fine-tuning samples from a prepared chat dataset (`tools/prepare_sft.py`): token ids
and a parallel loss mask, Megatron indexed datasets with the same document index, one document
per example ending in the end-of-document (EOD) id.

A sample is a `seq_len` window of input ids and their next-token labels; a label is
`IGNORE_INDEX` unless the mask marks its target token, so prompts, EODs and padding are never
trained on. By default a sample holds one example, padded to the window; an example longer than
the window (`seq_len + 1` tokens: the inputs and the last label) is cut there, and the tokens cut
off are not trained on (counted in `ChatSplit.truncated`). With `pack`, whole examples follow one
another in example order, each ending in EOD, as many as fit in a window, the rest padded: the
model must keep them apart (`data.document_attention`), which `validate` requires.

Train and validation split the examples, not the samples: the last `val_fraction` of them (at
least one) are held out, the same on every machine and for every data-parallel size.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset
from torch import Tensor

from llmscale.config.load import ConfigError
from llmscale.data.blend import check_tokenizer
from llmscale.data.tokenizer import Tokenizer

# The prefix of the token dataset in a prepared folder, and the suffix of its loss-mask twin.
CHAT_PREFIX = "chat"
LOSS_MASK_SUFFIX = "_loss_mask"
# The label the model's loss skips (torch's cross-entropy default; llmscale.models uses the same).
IGNORE_INDEX = -100


def loss_mask_prefix(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + LOSS_MASK_SUFFIX)


def pad_id_for(eod_id: int) -> int:
    """Padding fills a window's tail after the last EOD. Any id but EOD: with document attention
    the padding is then one document (a short one per pad token would cost an attention call
    each), and it never shares a document with an example."""
    return 1 if eod_id == 0 else 0


class ChatSamples:
    """(input_ids[seq_len], labels[seq_len]) samples, each holding the examples of one group
    (consecutive example indices)."""

    def __init__(self, tokens: IndexedDataset, masks: IndexedDataset,
                 groups: List[Tuple[int, int]], seq_len: int, eod_id: int, name: str) -> None:
        self.tokens = tokens
        self.masks = masks
        self.groups = groups
        self.seq_len = seq_len
        self.eod_id = eod_id
        self.pad_id = pad_id_for(eod_id)
        self.name = name
        self.split = _describe_split(masks, groups, seq_len)

    def describe(self) -> str:
        return f"{self.name} {self.split.describe()}"

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> Tuple[Tensor, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} is out of range for the {len(self)} samples of "
                             f"the {self.name}.")
        first, end = self.groups[index]
        window = self.seq_len + 1
        ids = np.full(window, self.pad_id, dtype=np.int64)
        mask = np.zeros(window, dtype=bool)
        filled = 0
        for example in range(first, end):
            length = min(int(self.tokens.sequence_lengths[example]), window - filled)
            ids[filled:filled + length] = self.tokens[example][:length]
            mask[filled:filled + length] = self.masks[example][:length] != 0
            filled += length
        inputs, targets = ids[:-1], ids[1:]
        # After an EOD the next example begins: never a target of the one that ended.
        supervised = mask[1:] & (inputs != self.eod_id)
        labels = np.where(supervised, targets, IGNORE_INDEX)
        return torch.from_numpy(inputs), torch.from_numpy(labels)


@dataclass(frozen=True)
class ChatSplit:
    """A split's examples and how they became samples."""

    examples: int
    samples: int
    # Examples longer than a window, cut at its end, and the trained-on tokens cut off with them.
    truncated: int
    supervised_tokens_cut: int

    def describe(self) -> str:
        return (f"{self.examples} examples in {self.samples} samples, {self.truncated} cut at "
                f"data.seq_len ({self.supervised_tokens_cut} trained-on tokens lost)")


def group_examples(lengths: np.ndarray, first: int, end: int, seq_len: int,
                   pack: bool) -> List[Tuple[int, int]]:
    """Examples [first, end) grouped into windows of `seq_len + 1` tokens: one each, or packed
    greedily in order (an example that does not fit in the rest of a window opens the next)."""
    if not pack:
        return [(example, example + 1) for example in range(first, end)]
    window, groups, start, filled = seq_len + 1, [], first, 0
    for example in range(first, end):
        length = int(lengths[example])
        if example > start and filled + length > window:
            groups.append((start, example))
            start, filled = example, 0
        filled += length
    if end > start:
        groups.append((start, end))
    return groups


def build_chat_datasets(folder: str, seq_len: int, val_fraction: float, pack: bool,
                        tokenizer: Tokenizer, root: Path) -> Tuple[ChatSamples, ChatSamples]:
    """The train and validation samples of the prepared chat folder `folder` (relative paths
    resolve against `root`), read as ids of `tokenizer`."""
    path = prepared_folder(folder, root)
    prepare = (f"python tools/prepare_sft.py --input DATA.jsonl --tokenizer TOKENIZER "
               f"--output {folder}")
    tokens, masks = open_masked_datasets(path / CHAT_PREFIX, f"data.chat={folder}",
                                         "chat dataset", prepare)
    check_prepared_tokenizer(path, "data.chat", tokenizer)
    count = len(tokens)
    train_end = training_end(count, val_fraction, f"data.chat={folder}", "examples")
    return tuple(
        ChatSamples(tokens, masks, group_examples(tokens.sequence_lengths, first, end, seq_len, pack),
                    seq_len, tokenizer.eod_id, name)
        for name, first, end in (("training split", 0, train_end),
                                 ("validation split", train_end, count))
    )


def prepared_folder(folder: str, root: Path) -> Path:
    path = Path(folder).expanduser()
    return path if path.is_absolute() else root / path


def open_masked_datasets(prefix: Path, setting: str, what: str,
                         prepare: str) -> Tuple[IndexedDataset, IndexedDataset]:
    """The token dataset at `prefix` and its loss-mask twin; `ConfigError` naming `setting` and
    the `prepare` command when a file is missing."""
    needed = [Path(f"{p}{suffix}") for p in (prefix, loss_mask_prefix(prefix))
              for suffix in (".bin", ".idx")]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise ConfigError(f"{setting} is not a prepared {what} (no {', '.join(missing)} in "
                          f"{prefix.parent}): create it with `{prepare}`")
    return IndexedDataset(str(prefix)), IndexedDataset(str(loss_mask_prefix(prefix)))


def check_prepared_tokenizer(path: Path, setting: str, tokenizer: Tokenizer) -> None:
    try:
        check_tokenizer(path, setting, tokenizer)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def training_end(count: int, val_fraction: float, setting: str, what: str) -> int:
    """Where the held-out tail of `count` examples begins: the last `val_fraction` of them, at
    least one, are held out; at least one is left to train on."""
    num_val = max(1, round(count * val_fraction))
    if count - num_val < 1:
        raise ConfigError(
            f"{setting} holds {count} {what}: too few to hold out "
            f"data.val_fraction={val_fraction} of them and train on the rest; prepare more"
        )
    return count - num_val


def _describe_split(masks: IndexedDataset, groups: List[Tuple[int, int]],
                    seq_len: int) -> ChatSplit:
    window = seq_len + 1
    truncated = cut = 0
    for start, stop in groups:
        filled = 0
        for example in range(start, stop):
            length = int(masks.sequence_lengths[example])
            if filled + length > window:
                truncated += 1
                cut += int(masks[example][max(0, window - filled):].sum())
            filled += length
    examples = sum(stop - start for start, stop in groups)
    return ChatSplit(examples, len(groups), truncated, cut)
