from pathlib import Path

import pytest
import torch

from llmscale.data import (
    ByteTokenizer,
    PackedDataset,
    load_token_stream,
    resolve_paths,
    split_train_val,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SHAKESPEARE = REPO_ROOT / "data" / "shakespeare"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_directory_means_every_file_in_it_sorted() -> None:
    files = resolve_paths(["data/shakespeare"], REPO_ROOT)
    assert files == sorted(SHAKESPEARE.glob("*.txt"))
    assert len(files) == 8


def test_directories_recurse_and_overlapping_patterns_count_once(tmp_path: Path) -> None:
    deep = write(tmp_path / "corpus" / "b" / "deep" / "a.txt", "x")
    top = write(tmp_path / "corpus" / "a.txt", "y")
    middle = write(tmp_path / "corpus" / "b" / "c.md", "z")
    assert resolve_paths(["corpus"], tmp_path) == [top, middle, deep]
    assert resolve_paths(["corpus", "corpus/a.txt", str(top)], tmp_path) == [top, middle, deep]


def test_glob_and_single_file_patterns(tmp_path: Path) -> None:
    assert resolve_paths(["data/shakespeare/[hl]*.txt"], REPO_ROOT) == [
        SHAKESPEARE / "hamlet.txt",
        SHAKESPEARE / "lear.txt",
    ]
    othello = SHAKESPEARE / "othello.txt"
    assert resolve_paths(["data/shakespeare/othello.txt"], REPO_ROOT) == [othello]
    nested = write(tmp_path / "x" / "y" / "z.txt", "z")
    assert resolve_paths(["**/*.txt"], tmp_path) == [nested]


@pytest.mark.parametrize("pattern", ["data/missing", "data/shakespeare/*.json"])
def test_pattern_matching_nothing_names_pattern_path_and_field(pattern: str) -> None:
    with pytest.raises(FileNotFoundError) as error:
        resolve_paths(["data/shakespeare", pattern], REPO_ROOT)
    message = str(error.value)
    assert repr(pattern) in message
    assert str(REPO_ROOT / pattern) in message
    assert "data.paths" in message


def test_empty_directory_matches_nothing(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="'empty' matches no file"):
        resolve_paths(["empty"], tmp_path)


def test_token_stream_ends_every_document_with_eod(tmp_path: Path) -> None:
    documents = ["First document.\n", "第二个文件", ""]
    paths = [write(tmp_path / f"{i}.txt", text) for i, text in enumerate(documents)]
    tokenizer = ByteTokenizer()
    stream = load_token_stream(paths, tokenizer)
    assert stream.dtype == torch.int64 and stream.dim() == 1
    assert int((stream == tokenizer.eod_id).sum()) == len(documents)
    assert int(stream[-1]) == tokenizer.eod_id
    eod_positions = (stream == tokenizer.eod_id).nonzero().flatten().tolist()
    starts = [0] + [p + 1 for p in eod_positions[:-1]]
    decoded = [tokenizer.decode(stream[s:e].tolist()) for s, e in zip(starts, eod_positions)]
    assert decoded == documents


def test_packed_samples_are_shifted_windows_covering_the_stream() -> None:
    tokens = torch.arange(23)
    dataset = PackedDataset(tokens, seq_len=5)
    assert len(dataset) == 4
    inputs, labels = zip(*(dataset[i] for i in range(len(dataset))))
    for i, (input_ids, target) in enumerate(zip(inputs, labels)):
        assert input_ids.shape == target.shape == (5,)
        assert torch.equal(input_ids, tokens[i * 5 : i * 5 + 5])
        assert torch.equal(target, tokens[i * 5 + 1 : i * 5 + 6])
    covered = torch.cat([*inputs, labels[-1][-1:]])
    assert torch.equal(covered, tokens[: len(dataset) * 5 + 1])
    with pytest.raises(IndexError):
        dataset[len(dataset)]


@pytest.mark.parametrize(("num_tokens", "expected_len"), [(6, 1), (10, 1), (11, 2), (21, 4)])
def test_packed_length_counts_complete_windows(num_tokens: int, expected_len: int) -> None:
    assert len(PackedDataset(torch.arange(num_tokens), seq_len=5)) == expected_len


def test_too_few_tokens_for_one_sample_is_explained() -> None:
    with pytest.raises(ValueError) as error:
        PackedDataset(torch.arange(5), seq_len=5, name="validation split")
    message = str(error.value)
    for expected in ("validation split has 5 tokens", "data.seq_len=5", "data.val_fraction"):
        assert expected in message


def test_validation_is_the_held_out_tail() -> None:
    tokens = torch.arange(100)
    train, val = split_train_val(tokens, val_fraction=0.1)
    assert torch.equal(train, tokens[:90]) and torch.equal(val, tokens[90:])
    train, val = split_train_val(tokens, val_fraction=0.0)
    assert train.numel() == 100 and val.numel() == 0
    with pytest.raises(ValueError, match="data.val_fraction"):
        split_train_val(tokens, val_fraction=1.0)


def test_bundled_corpus_gives_train_and_validation_samples() -> None:
    tokens = load_token_stream(resolve_paths(["data/shakespeare"], REPO_ROOT), ByteTokenizer())
    train, val = split_train_val(tokens, val_fraction=0.05)
    assert len(PackedDataset(train, seq_len=128)) > 7000
    assert len(PackedDataset(val, seq_len=128)) > 300
