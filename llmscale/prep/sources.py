"""Raw documents from the inputs a user names: plain text, JSON lines, parquet, and folders
written by `datasets.save_to_disk`, optionally gzip-compressed (text and JSON lines).

Reading never fails on bad data: what cannot become a document is reported as `Skipped` with
a reason, and the caller counts it. Decoding and parsing happen later, in worker processes.
A plain-text file read whole that is over the length limit (a book) is cut into pieces under it
rather than dropped.
"""

import gzip
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import datasets
import pyarrow
import pyarrow.parquet

from llmscale.data.corpus import resolve_paths

TEXT_DOCUMENT_UNITS = ("file", "paragraph", "line")
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
# Enough of a file's start to tell text from binary: text never holds a NUL byte.
_SNIFF_BYTES = 8192
# An input over this many bytes per allowed character cannot pass the length filter (a
# character is at most 4 UTF-8 bytes, 6 as a JSON escape), so it is skipped unread.
_READ_BYTES_PER_CHAR = 8
_BATCH_ROWS = 1024


@dataclass(frozen=True)
class ReadConfig:
    # Field holding the text in JSON records, parquet files and saved datasets ("a.b" reaches
    # into nested JSON objects).
    text_field: str = "text"
    # "file": each plain-text file is one document; "paragraph": each run of lines between
    # blank lines is one (books, poem collections); "line": each line is one.
    text_document: str = "file"
    # The split read from a folder holding a saved DatasetDict.
    dataset_split: str = "train"

    def __post_init__(self) -> None:
        if self.text_document not in TEXT_DOCUMENT_UNITS:
            raise ValueError(
                f"text_document must be one of {', '.join(TEXT_DOCUMENT_UNITS)}, "
                f"got {self.text_document!r}."
            )


@dataclass(frozen=True)
class RawDocument:
    # Where it came from, for messages: "path" or "path:line".
    origin: str
    # "text": the UTF-8 bytes of a document; "json": the bytes of one JSON record;
    # "str": text already decoded (parquet, saved datasets).
    kind: str
    payload: bytes | str


@dataclass(frozen=True)
class Skipped:
    origin: str
    reason: str
    # Documents it stands for: a parquet file without the text field skips all its rows.
    documents: int = 1
    size_bytes: int = 0


def find_sources(patterns: list[str], root: Path, config: ReadConfig) -> list[Path]:
    """Files and saved-dataset folders named by `patterns` (files, folders, globs), sorted.

    Raises FileNotFoundError for a pattern matching nothing and ValueError for a saved
    DatasetDict without the configured split, so bad inputs stop a run before any work.
    """
    found: set[Path] = set()
    for pattern in patterns:
        expanded = Path(pattern).expanduser()
        path = expanded if expanded.is_absolute() else root / expanded
        if _is_saved_dataset(path):
            found.add(path.resolve())
            continue
        for file in resolve_paths([pattern], root, source="--input"):
            found.add(_saved_dataset_holding(file) or file)
    for path in found:
        if (path / "dataset_dict.json").is_file():
            splits = datasets.load_from_disk(str(path)).keys()
            if config.dataset_split not in splits:
                raise ValueError(
                    f"saved dataset {path} has splits {sorted(splits)}, not "
                    f"{config.dataset_split!r}; choose one with --dataset-split."
                )
    return sorted(found)


def read_documents(
    path: Path, config: ReadConfig, max_chars: int, warn: Callable[[str], None] = print
) -> Iterator[RawDocument | Skipped]:
    """The documents of one source, in order. Documents of too many bytes to pass the length
    filter (`max_chars`) are skipped unread, except a plain-text file read whole: it is cut into
    pieces of at most `max_chars` characters, and a line of it still too long is named through
    `warn`. A source that cannot be read (corrupt parquet or gzip, no permission) ends in one
    `Skipped(reason="unreadable")` after whatever it yielded before the damage."""
    max_bytes = _READ_BYTES_PER_CHAR * max_chars
    try:
        if path.is_dir():
            yield from _saved_dataset(path, config, max_bytes)
        elif path.name.endswith(".parquet"):
            yield from _parquet(path, config, max_bytes)
        else:
            yield from _text_or_json(path, config, max_bytes, max_chars, warn)
    except (OSError, EOFError, zlib.error, pyarrow.ArrowException):
        yield Skipped(str(path), "unreadable")


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by `save_to_disk`: a DatasetDict, or one Dataset."""
    return (path / "dataset_dict.json").is_file() or all(
        (path / marker).is_file() for marker in ("state.json", "dataset_info.json")
    )


def _saved_dataset_holding(file: Path) -> Path | None:
    """The saved-dataset folder `file` belongs to (a glob can reach into one), if any."""
    if (file.parent.parent / "dataset_dict.json").is_file():
        return file.parent.parent
    return file.parent if _is_saved_dataset(file.parent) else None


def _open_binary(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def _text_or_json(
    path: Path, config: ReadConfig, max_bytes: int, max_chars: int, warn: Callable[[str], None]
) -> Iterator[RawDocument | Skipped]:
    origin = str(path)
    name = path.name.removesuffix(".gz")
    is_json = name.endswith(JSON_SUFFIXES)
    with _open_binary(path) as stream:
        head = stream.read(_SNIFF_BYTES)
        if not head:
            yield Skipped(origin, "empty")
            return
        if b"\0" in head:
            yield Skipped(origin, "binary", size_bytes=path.stat().st_size)
            return
        stream.seek(0)
        if not is_json and config.text_document == "file":
            data = stream.read(max_bytes + 1)
            if len(data) <= max_bytes and _characters(data) <= max_chars:
                yield RawDocument(origin, "text", data)
            else:
                stream.seek(0)
                yield from _file_pieces(stream, origin, max_bytes, max_chars, warn)
            return
        if not is_json and config.text_document == "paragraph":
            yield from _paragraphs(stream, origin, max_bytes)
            return
        kind = "json" if is_json else "text"
        for number, line, size in _bounded_lines(stream, max_bytes):
            line_origin = f"{origin}:{number}"
            if line is None:
                yield Skipped(line_origin, "too_long", size_bytes=size)
            elif not line.strip():
                yield Skipped(line_origin, "empty", size_bytes=size)
            else:
                yield RawDocument(line_origin, kind, line)


def _file_pieces(
    stream: BinaryIO, origin: str, max_bytes: int, max_chars: int, warn: Callable[[str], None]
) -> Iterator[RawDocument | Skipped]:
    """A text file over the length limit as pieces of at most `max_chars` characters, each cut at
    its last paragraph break, or at a line break when a paragraph alone is over the limit. A
    line over the limit has no break to cut at: it is skipped, with a warning naming the file."""
    piece: list[tuple[int, bytes, int]] = []  # (line number, line, characters with newline)
    size = 0  # characters of `piece`, newlines included
    cut = 0  # lines of `piece` up to its last blank line
    for number, line, line_bytes in _bounded_lines(stream, max_bytes):
        chars = None if line is None else _characters(line) + 1
        if chars is None or chars > max_chars + 1:
            yield from _piece(origin, piece)
            piece, size, cut = [], 0, 0
            warn(
                f"warning: {origin}: line {number} ({line_bytes:,} bytes) is over the "
                f"{max_chars:,} characters a document may have (--max-chars) and has no break "
                "to cut it at; dropped"
            )
            yield Skipped(f"{origin}:{number}", "too_long", size_bytes=line_bytes)
            continue
        # max_chars + 1: the piece's last line is written without its newline. Cut at the
        # paragraph break first; if what follows it is still too long, cut at this line.
        while size + chars > max_chars + 1:
            done, piece = (piece[:cut], piece[cut:]) if cut else (piece, [])
            yield from _piece(origin, done)
            size, cut = sum(entry[2] for entry in piece), 0
        piece.append((number, line, chars))
        size += chars
        if not line.strip():
            cut = len(piece)
    yield from _piece(origin, piece)


def _piece(origin: str, lines: list[tuple[int, bytes, int]]) -> Iterator[RawDocument]:
    """The lines as one document named by the line it starts at; none when they are blank."""
    text = b"\n".join(line for _, line, _ in lines)
    if text.strip():
        yield RawDocument(f"{origin}:{lines[0][0]}", "text", text)


def _characters(data: bytes) -> int:
    """Characters of UTF-8 `data`; bytes that are not UTF-8 count about one each."""
    return len(data.decode("utf-8", "replace"))


def _paragraphs(stream: BinaryIO, origin: str, max_bytes: int) -> Iterator[RawDocument | Skipped]:
    """Runs of non-blank lines (joined by their newlines); one over `max_bytes` is skipped."""
    lines: list[bytes] = []
    size = 0
    first = 0
    too_long = False
    for number, line, line_size in _bounded_lines(stream, max_bytes):
        if line is not None and not line.strip():
            if lines or too_long:
                yield _paragraph(f"{origin}:{first}", lines, size, too_long)
            lines, size, too_long = [], 0, False
            continue
        if not lines and not too_long:
            first = number
        size += line_size
        too_long = too_long or line is None or size > max_bytes
        if too_long:
            lines = []
        else:
            lines.append(line)
    if lines or too_long:
        yield _paragraph(f"{origin}:{first}", lines, size, too_long)


def _paragraph(origin: str, lines: list[bytes], size: int, too_long: bool) -> RawDocument | Skipped:
    if too_long:
        return Skipped(origin, "too_long", size_bytes=size)
    return RawDocument(origin, "text", b"\n".join(lines))


def _bounded_lines(stream: BinaryIO, max_bytes: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, line without its newline or None when longer than `max_bytes`, size).
    An over-long line is skipped in pieces, never held whole."""
    number = 0
    while True:
        line = stream.readline(max_bytes + 2)
        if not line:
            return
        number += 1
        content = line[:-1] if line.endswith(b"\n") else line
        if len(content) <= max_bytes:
            yield number, content, len(line)
            continue
        size = len(line)
        if not line.endswith(b"\n"):
            size += _drain(stream, until_newline=True)
        yield number, None, size


def _drain(stream: BinaryIO, until_newline: bool = False) -> int:
    """Reads on (to the next newline, or to the end) without keeping anything; bytes read."""
    size = 0
    while True:
        piece = stream.readline(1 << 20) if until_newline else stream.read(1 << 20)
        size += len(piece)
        if not piece or (until_newline and piece.endswith(b"\n")):
            return size


def _parquet(path: Path, config: ReadConfig, max_bytes: int) -> Iterator[RawDocument | Skipped]:
    parquet_file = pyarrow.parquet.ParquetFile(path)
    schema = parquet_file.schema_arrow
    field = config.text_field
    if field not in schema.names or not _is_text_type(schema.field(field).type):
        yield Skipped(str(path), "missing_field", documents=parquet_file.metadata.num_rows)
        return
    row = 0
    for batch in parquet_file.iter_batches(batch_size=_BATCH_ROWS, columns=[field]):
        for value in batch.column(0).to_pylist():
            row += 1
            yield _text_value(f"{path}:{row}", value, max_bytes)


def _saved_dataset(
    path: Path, config: ReadConfig, max_bytes: int
) -> Iterator[RawDocument | Skipped]:
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset[config.dataset_split]
    field = config.text_field
    feature = dataset.features.get(field)
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        yield Skipped(str(path), "missing_field", documents=dataset.num_rows)
        return
    row = 0
    for batch in dataset.select_columns([field]).iter(batch_size=_BATCH_ROWS):
        for value in batch[field]:
            row += 1
            yield _text_value(f"{path}:{row}", value, max_bytes)


def _is_text_type(arrow_type: pyarrow.DataType) -> bool:
    return pyarrow.types.is_string(arrow_type) or pyarrow.types.is_large_string(arrow_type)


def _text_value(origin: str, value: str | None, max_bytes: int) -> RawDocument | Skipped:
    if value is None:
        return Skipped(origin, "missing_field")
    # Characters never outnumber UTF-8 bytes, so this only skips what is surely too long.
    if len(value) > max_bytes:
        return Skipped(origin, "too_long", size_bytes=len(value))
    return RawDocument(origin, "str", value)
