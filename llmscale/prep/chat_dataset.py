"""Write a chat dataset: token ids and a parallel loss mask, both Megatron indexed datasets
(`<name>.bin/.idx` and `<name>_loss_mask.bin/.idx`) with the same document index, one document
per example ending in the end-of-document id (not trained on). Lines that are not usable
examples are skipped and counted; an example with nothing to train on stops the run, naming it.
"""

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, TypeVar

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from llmscale.data.blend import DATASET_METADATA
from llmscale.data.chat_samples import CHAT_PREFIX, loss_mask_prefix
from llmscale.data.tokenizer import Tokenizer, tokenizer_identity
from llmscale.prep.chat import (
    BadExample, ChatTemplate, UnsupervisedExample, parse_example, tokenize_conversation,
)
from llmscale.prep.tokenize_stage import publish, token_dtype

T = TypeVar("T")


@dataclass
class ChatReport:
    lines: int = 0
    examples: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    skipped: Dict[str, int] = field(default_factory=Counter)

    def describe(self) -> str:
        skipped = ", ".join(f"{reason} {count}" for reason, count in sorted(self.skipped.items()))
        return (f"{self.lines} lines: {self.examples} examples written, {self.tokens:,} tokens "
                f"({self.supervised_tokens:,} trained on); skipped: {skipped or 'none'}")


class MaskedDocuments:
    """A token dataset and its loss-mask twin (`<prefix>` and `<prefix>_loss_mask`) with the same
    document index, written under temporary names and published by `finish`."""

    def __init__(self, prefix: Path, vocab_size: int) -> None:
        self.prefix = prefix
        self.temporary = prefix.with_name(prefix.name + ".tmp")
        self.tokens = IndexedDatasetBuilder(f"{self.temporary}.bin", dtype=token_dtype(vocab_size))
        self.masks = IndexedDatasetBuilder(f"{loss_mask_prefix(self.temporary)}.bin",
                                           dtype=np.uint8)

    def add(self, ids: List[int], mask: List[int]) -> None:
        self.tokens.add_document(ids, [len(ids)])
        self.masks.add_document(mask, [len(mask)])

    def finish(self) -> None:
        self.tokens.finalize(f"{self.temporary}.idx")
        self.masks.finalize(f"{loss_mask_prefix(self.temporary)}.idx")
        publish(self.temporary, self.prefix)
        publish(loss_mask_prefix(self.temporary), loss_mask_prefix(self.prefix))


def converted_lines(inputs: List[Path], convert: Callable[[str], T], report: ChatReport,
                    warn=print) -> Iterator[T]:
    """`convert` of each non-empty line. A `BadExample` line is skipped and counted in `report`
    (the first three of each reason warned with their `file:line`); an `UnsupervisedExample`
    stops the run naming its `file:line`."""
    for path in inputs:
        with path.open(encoding="utf-8", errors="replace") as file:
            for number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                report.lines += 1
                try:
                    converted = convert(line)
                except BadExample as bad:
                    report.skipped[bad.reason] += 1
                    if report.skipped[bad.reason] <= 3:
                        warn(f"warning: {path}:{number}: skipped, {bad}")
                    continue
                except UnsupervisedExample as error:
                    raise UnsupervisedExample(f"{path}:{number}: {error}") from None
                yield converted


def with_end_of_document(ids: List[int], mask: List[int], tokenizer: Tokenizer):
    return ids + [tokenizer.eod_id], mask + [0]


def write_reports(output: Path, report: ChatReport, metadata: Dict[str, object]) -> None:
    """`dataset.json` (the tokenizer's identity and `metadata`) and `report.json`."""
    (output / DATASET_METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
    (output / "report.json").write_text(json.dumps(
        {**report.__dict__, "skipped": dict(report.skipped)}, indent=2) + "\n")


def no_usable_lines(inputs: List[Path], report: ChatReport, what: str) -> ValueError:
    return ValueError(f"no usable {what} in {[str(p) for p in inputs]}: {report.describe()}")


def write_chat_dataset(inputs: List[Path], output: Path, tokenizer: Tokenizer,
                       template: ChatTemplate, train_on_prompt: bool = False,
                       warn=print) -> ChatReport:
    """`output/chat.bin/.idx`, `output/chat_loss_mask.bin/.idx`, `dataset.json` and
    `report.json`. Written under temporary names and renamed when complete."""
    output.mkdir(parents=True, exist_ok=True)
    documents = MaskedDocuments(output / CHAT_PREFIX, tokenizer.vocab_size)
    report = ChatReport()

    def convert(line: str):
        return tokenize_conversation(parse_example(line), template, tokenizer, train_on_prompt)

    for ids, mask in converted_lines(inputs, convert, report, warn):
        ids, mask = with_end_of_document(ids, mask, tokenizer)
        documents.add(ids, mask)
        report.examples += 1
        report.tokens += len(ids)
        report.supervised_tokens += sum(mask)
    if report.examples == 0:
        raise no_usable_lines(inputs, report, "example")
    documents.finish()
    write_reports(output, report, {
        "tokenizer": tokenizer_identity(tokenizer), "chat_template": template.origin,
        "train_on_prompt": train_on_prompt, "documents": report.examples,
        "tokens": report.tokens})
    return report


def read_example(prefix: Path, index: int, tokenizer: Optional[Tokenizer] = None):
    """Example `index`'s ids and mask (and, given the tokenizer, its trained-on text)."""
    tokens, masks = IndexedDataset(str(prefix)), IndexedDataset(str(loss_mask_prefix(prefix)))
    # Copied out while the datasets live: the arrays are views of their memory maps.
    ids, mask = tokens[index].copy(), masks[index].copy()
    if tokenizer is None:
        return ids, mask
    return ids, mask, tokenizer.decode([i for i, m in zip(ids.tolist(), mask.tolist()) if m])
