"""Preference pairs as samples: a sample holds both halves of one pair, each labelled on its
response alone; a micro-batch of N pairs is 2N sequences with every pair whole; the last pairs
are held out."""

import json

import pytest
import torch

from llmscale.config.load import ConfigError
from llmscale.data import ByteTokenizer, GlobalSampleOrder, rank_micro_batches
from llmscale.data.preference_pairs import build_pair_datasets
from llmscale.models.fused_loss import IGNORE_INDEX
from llmscale.prep.chat import find_chat_template
from llmscale.prep.preference_dataset import write_preference_dataset

PAIRS = [{"prompt": f"Question {i}?", "chosen": f"Right {i}.", "rejected": f"Wrong answer {i}."}
         for i in range(6)]


def prepare(tmp_path, pairs=PAIRS):
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    folder = tmp_path / "prepared"
    write_preference_dataset([source], folder, ByteTokenizer(), find_chat_template(None, None),
                             warn=lambda _: None)
    return folder


def response_text(inputs, labels) -> str:
    kept = labels != IGNORE_INDEX
    return ByteTokenizer().decode(labels[kept].tolist())


def test_a_sample_is_the_chosen_and_the_rejected_response_of_one_pair(tmp_path):
    train, val = build_pair_datasets(str(prepare(tmp_path)), 128, 1 / 3, ByteTokenizer(),
                                     tmp_path)
    assert (len(train), len(val)) == (4, 2)
    inputs, labels, pair = train[2]
    assert inputs.shape == labels.shape == (2, 128) and int(pair) == 2
    assert response_text(inputs[0], labels[0]).startswith("Right 2.")
    assert response_text(inputs[1], labels[1]).startswith("Wrong answer 2.")
    # Labels are the next tokens: the prompt before the response is the same in both rows.
    first = int((labels[0] != IGNORE_INDEX).nonzero()[0])
    assert torch.equal(inputs[0, :first], inputs[1, :first])
    # The held-out pairs are the last ones, indexed as in the folder.
    assert [int(val[i][2]) for i in range(len(val))] == [4, 5]


def test_a_micro_batch_of_n_pairs_holds_every_pair_whole_on_any_number_of_ranks(tmp_path):
    train, _ = build_pair_datasets(str(prepare(tmp_path)), 128, 1 / 3, ByteTokenizer(), tmp_path)
    order = GlobalSampleOrder(len(train), seed=3)
    for dp in (1, 2):
        for rank in range(dp):
            for inputs, labels, pairs in rank_micro_batches(train, order, 0, 2, 2 // dp, rank,
                                                            dp):
                assert inputs.shape == labels.shape == (2, 2, 128) and pairs.shape == (2,)
                for row, pair in enumerate(pairs.tolist()):
                    assert response_text(inputs[row, 0], labels[row, 0]).startswith(
                        f"Right {pair}.")
                    assert response_text(inputs[row, 1], labels[row, 1]).startswith(
                        f"Wrong answer {pair}.")


def test_a_folder_without_pair_files_names_the_setting_and_the_command(tmp_path):
    with pytest.raises(ConfigError, match=r"data.pairs=.*no chosen.bin.*--pairs"):
        build_pair_datasets(str(tmp_path), 128, 0.5, ByteTokenizer(), tmp_path)
