"""Stage 2: cleaned parts tokenized, in parallel worker processes, into Megatron indexed
datasets (`.bin` + `.idx`, written by megatron-core's IndexedDatasetBuilder), one per part.

Each document is its token ids followed by the end-of-document id. A part is written under a
temporary name and renamed, `.idx` last, so an existing `.idx` means a finished part: a re-run
skips it, and the files end byte-identical to an uninterrupted run's.
"""

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

from llmscale.data.tokenizer import Tokenizer, open_tokenizer
from llmscale.prep.process_pool import ordered_map

# Characters of text encoded per tokenizer call: large enough to leave the per-call overhead
# negligible, small enough to keep a worker's memory flat.
_ENCODE_BATCH_CHARS = 1 << 20


@dataclass(frozen=True)
class TokenizeTask:
    cleaned_part: Path
    # Output path prefix: `<prefix>.bin` and `<prefix>.idx`.
    prefix: Path
    # What `open_tokenizer` takes: "byte", a `.model` or a `tokenizer.json` path.
    tokenizer: str
    eod_token: str | None = None


@dataclass(frozen=True)
class TokenizedPart:
    prefix: Path
    documents: int
    tokens: int
    # True when this run wrote it; False when a finished part was found and kept.
    written: bool


def token_dtype(vocab_size: int) -> type[np.number]:
    """uint16 while every id fits, int32 beyond (Megatron's own choice)."""
    return DType.optimal_dtype(vocab_size)


def is_finished(prefix: Path) -> bool:
    return _with_suffix(prefix, ".idx").is_file() and _with_suffix(prefix, ".bin").is_file()


def tokenize_parts(tasks: list[TokenizeTask], workers: int) -> list[TokenizedPart]:
    """Every task's part tokenized (or, if finished before, counted), in task order."""
    # One task per call: parts are large, and a worker holds one at a time.
    return list(ordered_map(tokenize_part, tasks, workers))


def tokenize_part(task: TokenizeTask) -> TokenizedPart:
    if is_finished(task.prefix):
        dataset = IndexedDataset(str(task.prefix))
        return TokenizedPart(
            task.prefix, len(dataset), int(dataset.sequence_lengths.sum(dtype=np.int64)), False
        )
    tokenizer = _cached_tokenizer(task.tokenizer, task.eod_token)
    temporary = task.prefix.with_name(task.prefix.name + ".tmp")
    task.prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(
        str(_with_suffix(temporary, ".bin")), dtype=token_dtype(tokenizer.vocab_size)
    )
    documents = tokens = 0
    for texts in _text_batches(task.cleaned_part):
        for ids in tokenizer.encode_batch(texts):
            ids.append(tokenizer.eod_id)
            builder.add_document(ids, [len(ids)])
            documents += 1
            tokens += len(ids)
    builder.finalize(str(_with_suffix(temporary, ".idx")))
    publish(temporary, task.prefix)
    return TokenizedPart(task.prefix, documents, tokens, True)


@lru_cache(maxsize=2)
def _cached_tokenizer(spec: str, eod_token: str | None) -> Tokenizer:
    # Each worker loads the tokenizer once, not once per part; Hugging Face tokenizers would
    # otherwise also start threads of their own inside every worker.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return open_tokenizer(spec, eod_token)


def _text_batches(part: Path) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    with part.open(encoding="utf-8") as file:
        for record in file:
            text = json.loads(record)["text"]
            batch.append(text)
            size += len(text)
            if size >= _ENCODE_BATCH_CHARS:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def publish(temporary: Path, prefix: Path) -> None:
    """Rename a finished dataset's files from `temporary` to `prefix`, `.idx` last: an `.idx`
    under the final name means a complete dataset."""
    for suffix in (".bin", ".idx"):
        os.replace(_with_suffix(temporary, suffix), _with_suffix(prefix, suffix))


def _with_suffix(prefix: Path, suffix: str) -> Path:
    return prefix.with_name(prefix.name + suffix)
