"""Stage 1: every input document read, cleaned, filtered and deduplicated, in corpus order,
into parts of JSON lines (`{"text": ...}`) per dataset.

Workers do the per-document work; this process deduplicates in order and writes. At each
finished part the dedup index commits together with the position reached, so a killed run
resumes there and writes the same bytes as one never stopped.
"""

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path

from llmscale.prep.corpus_stats import DatasetStats
from llmscale.prep.dedup import DedupIndex
from llmscale.prep.prepare import PrepareConfig, prepare_batch
from llmscale.prep.process_pool import ordered_map
from llmscale.prep.sources import RawDocument, Skipped, read_documents

# Documents handed to a worker at once: big enough to amortise the hand-over, small enough
# that the read-ahead (two batches per worker) stays a few megabytes.
_BATCH_DOCUMENTS = 64
_BATCH_BYTES = 1 << 20


@dataclass(frozen=True)
class DatasetSources:
    name: str
    sources: tuple[Path, ...]


@dataclass(frozen=True)
class CleanedCorpus:
    stats: dict[str, DatasetStats]
    # Per dataset, its cleaned parts in order.
    parts: dict[str, list[Path]]
    near_duplicate_clusters: int


def part_path(folder: Path, dataset: str, number: int) -> Path:
    return folder / dataset / f"part-{number:05d}.jsonl"


def clean_corpus(
    datasets: list[DatasetSources],
    config: PrepareConfig,
    folder: Path,
    index: DedupIndex,
    workers: int,
    part_bytes: int,
    log: Callable[[str], None],
) -> CleanedCorpus:
    state = index.load() or {"position": 0, "next_part": {}, "stats": {}, "done": False}
    stats = {d.name: DatasetStats.from_dict(state["stats"].get(d.name, {})) for d in datasets}
    next_part: dict[str, int] = state["next_part"]
    if not state["done"]:
        position = state["position"]
        writer: _PartWriter | None = None
        items = islice(_corpus_items(datasets, config, log), position, None)
        work = partial(_prepare_named, config=config)
        for results in ordered_map(work, _batches(items), workers):
            for name, document in results:
                if writer is None or writer.dataset != name:
                    if writer is not None:
                        next_part[writer.dataset] = writer.close()
                        index.save(_state(position, next_part, stats, done=False))
                    writer = _PartWriter(folder, name, next_part.get(name, 0), part_bytes)
                position += 1
                reason = document.reason
                if reason is None:
                    reason = index.check(position, document.digest, document.signature)
                kept_bytes = len(document.text.encode("utf-8")) if reason is None else 0
                stats[name].record(document, reason, kept_bytes)
                if reason is None and writer.write(document.text):
                    next_part[name] = writer.number
                    index.save(_state(position, next_part, stats, done=False))
        if writer is not None:
            next_part[writer.dataset] = writer.close()
        index.save(_state(position, next_part, stats, done=True))
    parts = {
        d.name: [part_path(folder, d.name, n) for n in range(next_part.get(d.name, 0))]
        for d in datasets
    }
    return CleanedCorpus(stats, parts, index.near_duplicate_clusters())


def cleaned_lines(parts: list[Path]) -> Iterator[str]:
    """The lines of the cleaned documents in `parts`, for tokenizer training."""
    for part in parts:
        with part.open(encoding="utf-8") as file:
            for record in file:
                yield from json.loads(record)["text"].split("\n")


def _state(
    position: int, next_part: dict[str, int], stats: dict[str, DatasetStats], done: bool
) -> dict:
    return {
        "position": position,
        "next_part": dict(next_part),
        "stats": {name: item.to_dict() for name, item in stats.items()},
        "done": done,
    }


def _corpus_items(
    datasets: list[DatasetSources], config: PrepareConfig, warn: Callable[[str], None]
) -> Iterator[tuple[str, RawDocument | Skipped]]:
    for dataset in datasets:
        for source in dataset.sources:
            for item in read_documents(source, config.read, config.quality.max_chars, warn):
                yield dataset.name, item


def _batches(
    items: Iterator[tuple[str, RawDocument | Skipped]],
) -> Iterator[list[tuple[str, RawDocument | Skipped]]]:
    batch: list[tuple[str, RawDocument | Skipped]] = []
    size = 0
    for item in items:
        batch.append(item)
        payload = item[1].payload if isinstance(item[1], RawDocument) else ""
        size += len(payload)
        if len(batch) >= _BATCH_DOCUMENTS or size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _prepare_named(batch: list[tuple[str, RawDocument | Skipped]], config: PrepareConfig) -> list:
    names = [name for name, _ in batch]
    return list(zip(names, prepare_batch([item for _, item in batch], config)))


class _PartWriter:
    """Writes one dataset's documents into parts of about `part_bytes`, each written under a
    temporary name and renamed when complete."""

    def __init__(self, folder: Path, dataset: str, first_number: int, part_bytes: int) -> None:
        self.folder = folder
        self.dataset = dataset
        self.number = first_number
        self.part_bytes = part_bytes
        self._file = None
        self._size = 0

    def write(self, text: str) -> bool:
        """Appends a document; True when that completed a part."""
        if self._file is None:
            path = self._temporary()
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("wb")
        line = (json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("utf-8")
        self._file.write(line)
        self._size += len(line)
        if self._size < self.part_bytes:
            return False
        self._finish()
        return True

    def close(self) -> int:
        """Finishes the open part, if any; the number the next part of this dataset gets."""
        if self._file is not None:
            self._finish()
        return self.number

    def _finish(self) -> None:
        assert self._file is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._temporary(), part_path(self.folder, self.dataset, self.number))
        self._file = None
        self._size = 0
        self.number += 1

    def _temporary(self) -> Path:
        path = part_path(self.folder, self.dataset, self.number)
        return path.with_name(path.name + ".tmp")
