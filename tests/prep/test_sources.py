import gzip
import json
import tracemalloc
from pathlib import Path

import datasets
import pyarrow
import pyarrow.parquet
import pytest
from corpus_fixtures import CHINESE, REPO_ROOT, english_paragraphs

from llmscale.prep.prepare import PrepareConfig, prepare
from llmscale.prep.quality import QualityConfig
from llmscale.prep.sources import RawDocument, ReadConfig, Skipped, find_sources, read_documents

TEXT = english_paragraphs(count=3)
MAX_CHARS = 1 << 17
# What read_documents reads at most of one document before skipping it unread.
MAX_BYTES = 8 * MAX_CHARS


def outcomes(path: Path, read: ReadConfig | None = None) -> list[str]:
    """Per document of `path`: "kept", or the reason it is dropped before deduplication."""
    read = read or ReadConfig()
    config = PrepareConfig(read=read)
    results = [prepare(item, config) for item in read_documents(path, read, MAX_CHARS)]
    return [result.reason or "kept" for result in results]


def write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def jsonl(path: Path, records: list) -> Path:
    lines = [
        r if isinstance(r, (str, bytes)) else json.dumps(r, ensure_ascii=False) for r in records
    ]
    data = b"\n".join(line.encode() if isinstance(line, str) else line for line in lines) + b"\n"
    return write_bytes(path, data)


def test_plain_text_file_is_one_document(tmp_path: Path) -> None:
    path = write_bytes(tmp_path / "a.txt", TEXT[0].encode())
    (item,) = read_documents(path, ReadConfig(), MAX_CHARS)
    assert isinstance(item, RawDocument) and item.payload == TEXT[0].encode()
    assert outcomes(path) == ["kept"]


def test_a_text_file_over_the_length_limit_is_cut_into_documents_not_dropped(
    tmp_path: Path,
) -> None:
    """All eight bundled plays in one file, as a book would be: 1,036,000 characters, over the
    default --max-chars of 1,000,000."""
    plays = sorted((REPO_ROOT / "data" / "shakespeare").glob("*.txt"))
    path = write_bytes(tmp_path / "plays.txt", b"".join(play.read_bytes() for play in plays))
    warnings: list[str] = []
    max_chars = QualityConfig().max_chars
    items = list(read_documents(path, ReadConfig(), max_chars, warnings.append))
    assert len(items) == 2 and not warnings
    assert items[0].origin == f"{path}:1" and items[1].origin.startswith(f"{path}:")
    # Cut after a blank line, and nothing lost.
    assert items[0].payload.endswith(b"\n") and not items[1].payload.startswith(b"\n")
    assert b"\n".join(item.payload for item in items) == path.read_bytes().removesuffix(b"\n")
    assert all(len(item.payload.decode()) <= max_chars for item in items)


def test_a_paragraph_over_the_limit_is_cut_at_line_breaks(tmp_path: Path) -> None:
    # A Chinese novel's layout after its title: paragraphs indented, no blank lines between.
    lines = ["第一章", ""] + [f"\u3000\u3000{CHINESE[i % 5]}第{i}段。" for i in range(40)]
    path = write_bytes(tmp_path / "novel.txt", "\n".join(lines).encode())
    items = list(read_documents(path, ReadConfig(), 1000, print))
    texts = [item.payload.decode() for item in items]
    assert len(items) > 1 and all(len(text) <= 1000 for text in texts)
    assert "\n".join(texts).split("\n") == lines


def test_a_line_over_the_limit_is_dropped_with_a_warning_naming_the_file(tmp_path: Path) -> None:
    path = write_bytes(
        tmp_path / "log.txt", f"{TEXT[0]}\n\n{'x' * 3000}\n\n{TEXT[1]}\n".encode()
    )
    warnings: list[str] = []
    items = list(read_documents(path, ReadConfig(), 2000, warnings.append))
    assert [getattr(item, "reason", "doc") for item in items] == ["doc", "too_long", "doc"]
    number = TEXT[0].count("\n") + 3
    assert items[1].origin == f"{path}:{number}" and items[1].size_bytes == 3001
    (warning,) = warnings
    assert warning.startswith(f"warning: {path}: line {number} (3,001 bytes) is over the 2,000")


def test_bad_files_are_skipped_with_their_reason(tmp_path: Path) -> None:
    empty = write_bytes(tmp_path / "empty.txt", b"")
    blank = write_bytes(tmp_path / "blank.txt", b"  \n\t\n")
    binary = write_bytes(tmp_path / "image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 50)
    latin1 = write_bytes(tmp_path / "latin1.txt", ("café " * 30).encode("latin-1"))
    assert outcomes(empty) == ["empty"]
    assert outcomes(blank) == ["empty"]
    assert outcomes(binary) == ["binary"]
    assert outcomes(latin1) == ["invalid_utf8"]


def test_every_bad_json_line_is_skipped_and_the_good_ones_kept(tmp_path: Path) -> None:
    path = jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"text": TEXT[0], "id": 1},
            "{not json",
            {"content": TEXT[1]},
            {"text": 42},
            ["text", TEXT[1]],
            "",
            b'{"text": "caf\xe9 latin-1 bytes"}',
            {"text": CHINESE[0]},
        ],
    )
    assert outcomes(path) == [
        "kept",
        "bad_json",
        "missing_field",
        "missing_field",
        "missing_field",
        "empty",
        "invalid_utf8",
        "kept",
    ]


def test_json_field_is_configurable_and_reaches_into_objects(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "nested.jsonl", [{"meta": {"body": TEXT[0]}}, {"body": TEXT[1]}])
    assert outcomes(path, ReadConfig(text_field="meta.body")) == ["kept", "missing_field"]
    assert outcomes(path, ReadConfig(text_field="body")) == ["missing_field", "kept"]


def test_gzip_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl.gz"
    path.write_bytes(
        gzip.compress(b"".join(json.dumps({"text": t}).encode() + b"\n" for t in TEXT))
    )
    assert outcomes(path) == ["kept"] * 3
    broken = write_bytes(tmp_path / "broken.jsonl.gz", gzip.compress(b'{"text": "x"}\n' * 100)[:40])
    assert outcomes(broken)[-1] == "unreadable"


@pytest.mark.parametrize("name", ["huge.txt", "huge.jsonl"])
def test_a_50_megabyte_line_is_skipped_without_being_held(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    with path.open("wb") as file:
        file.write(b'{"text": "' if name.endswith(".jsonl") else b"")
        for _ in range(50):
            file.write(b"x" * (1 << 20))
        file.write(b'"}\n' if name.endswith(".jsonl") else b"\n")
        file.write(
            json.dumps({"text": TEXT[0]}).encode() + b"\n" if name.endswith(".jsonl") else b""
        )
    tracemalloc.start()
    items = list(read_documents(path, ReadConfig(), MAX_CHARS))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert isinstance(items[0], Skipped) and items[0].reason == "too_long"
    assert items[0].size_bytes >= 50 << 20
    assert peak < 8 * MAX_BYTES
    assert [type(item) for item in items[1:]] == ([RawDocument] if name.endswith(".jsonl") else [])


def test_paragraph_and_line_documents(tmp_path: Path) -> None:
    path = write_bytes(tmp_path / "poems.txt", ("\n\n\n".join(CHINESE[:3]) + "\n").encode())
    assert outcomes(path, ReadConfig(text_document="paragraph")) == ["kept"] * 3
    assert outcomes(path, ReadConfig(text_document="line")) == [
        "kept",
        "empty",
        "empty",
        "kept",
        "empty",
        "empty",
        "kept",
    ]
    over = write_bytes(
        tmp_path / "over.txt", b"short one\n\n" + b"y" * (MAX_BYTES + 5) + b"\nz\n\nlast\n"
    )
    items = list(read_documents(over, ReadConfig(text_document="paragraph"), MAX_CHARS))
    assert [getattr(item, "reason", "doc") for item in items] == ["doc", "too_long", "doc"]


def test_parquet_text_column_nulls_and_missing_columns(tmp_path: Path) -> None:
    table = pyarrow.table({"text": [TEXT[0], None, CHINESE[1]], "n": [1, 2, 3]})
    path = tmp_path / "docs.parquet"
    pyarrow.parquet.write_table(table, path)
    assert outcomes(path) == ["kept", "missing_field", "kept"]
    assert outcomes(path, ReadConfig(text_field="n")) == ["missing_field"]
    (skipped,) = read_documents(path, ReadConfig(text_field="body"), MAX_CHARS)
    assert isinstance(skipped, Skipped) and skipped.documents == 3
    not_parquet = write_bytes(tmp_path / "fake.parquet", b"PAR1 but not really")
    assert outcomes(not_parquet) == ["unreadable"]


def test_saved_datasets_folders(tmp_path: Path) -> None:
    dataset = datasets.Dataset.from_dict({"text": [TEXT[0], CHINESE[2]]})
    dataset.save_to_disk(str(tmp_path / "single"))
    split = datasets.DatasetDict({"train": dataset, "test": dataset.select([0])})
    split.save_to_disk(str(tmp_path / "splits"))
    found = find_sources(["single", "splits"], tmp_path, ReadConfig())
    assert found == [tmp_path / "single", tmp_path / "splits"]
    assert outcomes(tmp_path / "single") == ["kept", "kept"]
    assert outcomes(tmp_path / "splits", ReadConfig(dataset_split="test")) == ["kept"]
    # A glob reaching into a saved folder finds the folder, not its arrow files.
    assert find_sources(["single/*"], tmp_path, ReadConfig()) == [tmp_path / "single"]
    with pytest.raises(
        ValueError, match=r"splits \['test', 'train'\], not 'validation'.*--dataset-split"
    ):
        find_sources(["splits"], tmp_path, ReadConfig(dataset_split="validation"))


def test_missing_input_names_the_flag(tmp_path: Path) -> None:
    write_bytes(tmp_path / "here.txt", b"x")
    with pytest.raises(
        FileNotFoundError, match="--input entry 'nowhere/\\*.jsonl' matches no file"
    ):
        find_sources(["here.txt", "nowhere/*.jsonl"], tmp_path, ReadConfig())


def test_an_unrelated_state_json_does_not_make_a_folder_a_saved_dataset(tmp_path: Path) -> None:
    write_bytes(tmp_path / "project" / "state.json", b"{}")
    text = write_bytes(tmp_path / "project" / "data" / "notes.txt", TEXT[0].encode())
    assert find_sources(["project/data"], tmp_path, ReadConfig()) == [text]
    assert find_sources(["project/state.json"], tmp_path, ReadConfig()) == [
        tmp_path / "project" / "state.json"
    ]
