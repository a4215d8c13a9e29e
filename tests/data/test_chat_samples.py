"""Chat samples from a prepared folder: labels from loss masks, padding, truncation, packing with
EOD, the train / validation split, and the errors a user can meet."""

from pathlib import Path
from typing import List, Tuple

import pytest
import torch

from llmscale.config.load import ConfigError
from llmscale.data import ByteTokenizer, document_position_ids
from llmscale.data.chat_samples import IGNORE_INDEX, build_chat_datasets, group_examples
from llmscale.models.fused_loss import IGNORE_INDEX as MODEL_IGNORE_INDEX
from llmscale.data.tokenizer import tokenizer_identity
from llmscale.prep.chat_dataset import ChatReport, MaskedDocuments, write_reports

TOKENIZER = ByteTokenizer()
EOD = TOKENIZER.eod_id
X = IGNORE_INDEX
# (ids, mask) per example, each ending in EOD (mask 0) as tools/prepare_sft.py writes them.
EXAMPLES = [
    ([10, 11, 12, 13, 14, EOD], [0, 0, 1, 1, 0, 0]),
    ([20, 21, 22, EOD], [0, 1, 1, 0]),
    ([30, 31, 32, 33, 34, 35, 36, 37, 38, 39, EOD], [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0]),
    ([40, 41, EOD], [1, 1, 0]),
    ([50, 51, 52, EOD], [0, 1, 1, 0]),
]


def prepare(folder: Path, examples: List[Tuple[List[int], List[int]]] = EXAMPLES) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    documents = MaskedDocuments(folder / "chat", TOKENIZER.vocab_size)
    for ids, mask in examples:
        documents.add(ids, mask)
    documents.finish()
    write_reports(folder, ChatReport(), {"tokenizer": tokenizer_identity(TOKENIZER)})
    return str(folder)


def build(folder: str, seq_len: int = 8, val_fraction: float = 0.2, pack: bool = False):
    return build_chat_datasets(folder, seq_len, val_fraction, pack, TOKENIZER, Path("/"))


def test_labels_are_the_next_tokens_the_mask_marks_and_padding_is_ignored(tmp_path) -> None:
    train, _ = build(prepare(tmp_path))
    inputs, labels = train[0]
    pad = train.pad_id
    assert inputs.tolist() == [10, 11, 12, 13, 14, EOD, pad, pad]
    assert labels.tolist() == [X, 12, 13, X, X, X, X, X]
    assert pad != EOD
    assert IGNORE_INDEX == MODEL_IGNORE_INDEX  # the value the model's loss skips


def test_a_long_example_is_cut_at_the_window_and_counted(tmp_path) -> None:
    train, _ = build(prepare(tmp_path), seq_len=6)
    inputs, labels = train[2]  # 11 tokens: the window holds 7 (6 inputs, the last label)
    assert inputs.tolist() == [30, 31, 32, 33, 34, 35]
    assert labels.tolist() == [X, X, 33, 34, 35, 36]
    # Cut off: 37, 38, 39 (trained on) and EOD.
    assert (train.split.truncated, train.split.supervised_tokens_cut) == (1, 3)
    assert "1 cut at data.seq_len (3 trained-on tokens lost)" in train.describe()


def test_packing_lays_whole_examples_apart_by_eod(tmp_path) -> None:
    examples = [([10, 11, 12, EOD], [0, 1, 1, 0]), ([20, 21, EOD], [1, 1, 0]),
                ([30, 31, 32, EOD], [0, 1, 1, 0]), ([40, EOD], [0, 0])]
    train, _ = build(prepare(tmp_path, examples), seq_len=8, val_fraction=0.25, pack=True)
    assert train.groups == [(0, 2), (2, 3)]  # 4 + 3 tokens fit in 9; the third opens a window
    inputs, labels = train[0]
    pad = train.pad_id
    assert inputs.tolist() == [10, 11, 12, EOD, 20, 21, EOD, pad]
    # The second example's first token is trained on, but never as the target after an EOD.
    assert labels.tolist() == [11, 12, X, X, 21, X, X, X]
    # With document attention each example (and the padding) has positions of its own.
    assert document_position_ids(inputs, EOD).tolist() == [0, 1, 2, 3, 0, 1, 2, 0]


def test_packing_groups_greedily_in_order() -> None:
    lengths = [5, 4, 9, 12, 1, 1]
    assert group_examples(lengths, 0, 6, seq_len=8, pack=True) == [(0, 2), (2, 3), (3, 4), (4, 6)]
    assert group_examples(lengths, 2, 4, seq_len=8, pack=False) == [(2, 3), (3, 4)]


def test_the_last_examples_are_held_out(tmp_path) -> None:
    folder = prepare(tmp_path)
    train, validation = build(folder, val_fraction=0.4)
    assert (len(train), len(validation)) == (3, 2)
    assert validation[0][0][:3].tolist() == [40, 41, EOD]
    again, _ = build(folder, val_fraction=0.4)
    assert all(torch.equal(again[i][1], train[i][1]) for i in range(len(train)))
    _, at_least_one = build(folder, val_fraction=0.01)
    assert len(at_least_one) == 1


def test_a_folder_without_chat_files_names_the_setting_and_the_command(tmp_path) -> None:
    with pytest.raises(ConfigError) as caught:
        build(str(tmp_path))
    message = str(caught.value)
    assert f"data.chat={tmp_path} is not a prepared chat dataset" in message
    assert "chat.bin" in message and "tools/prepare_sft.py" in message


def test_data_of_another_tokenizer_is_refused(tmp_path) -> None:
    folder = prepare(tmp_path)
    (tmp_path / "dataset.json").write_text('{"tokenizer": {"vocab_size": 32000}}')
    with pytest.raises(ConfigError, match=r"data\.chat .* was tokenized with"):
        build(folder)


def test_too_few_examples_to_split_are_refused(tmp_path) -> None:
    folder = prepare(tmp_path, EXAMPLES[:1])
    with pytest.raises(ConfigError, match="holds 1 examples: too few"):
        build(folder)
