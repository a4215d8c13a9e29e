"""The per-document work of the cleaning stage, run in worker processes: decode, clean, filter,
and compute what deduplication needs. A pure function of the document and the settings."""

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from llmscale.prep.cleaning import CleaningConfig, clean_text
from llmscale.prep.dedup import DedupConfig, content_hash, minhash_signature
from llmscale.prep.quality import QualityConfig, drop_reason
from llmscale.prep.sources import RawDocument, ReadConfig, Skipped
from llmscale.prep.units import text_units


@dataclass(frozen=True)
class PrepareConfig:
    read: ReadConfig = field(default_factory=ReadConfig)
    cleaning: CleaningConfig = field(default_factory=CleaningConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)


@dataclass(frozen=True)
class PreparedDocument:
    # Input documents and bytes it accounts for.
    documents: int
    size_bytes: int
    # Why it is dropped (a report key), or None when it passed cleaning and filtering.
    reason: str | None
    text: str = ""
    digest: bytes = b""
    signature: np.ndarray | None = None
    terminal_escapes_removed: int = 0
    emails_scrubbed: int = 0
    phones_scrubbed: int = 0


def prepare_batch(
    items: Sequence[RawDocument | Skipped], config: PrepareConfig
) -> list[PreparedDocument]:
    return [prepare(item, config) for item in items]


def prepare(item: RawDocument | Skipped, config: PrepareConfig) -> PreparedDocument:
    if isinstance(item, Skipped):
        return PreparedDocument(item.documents, item.size_bytes, item.reason)
    text, size, reason = _decode(item, config.read.text_field)
    if text is None:
        return PreparedDocument(1, size, reason)
    cleaned = clean_text(text, config.cleaning)
    counts = {
        "terminal_escapes_removed": cleaned.terminal_escapes_removed,
        "emails_scrubbed": cleaned.emails_scrubbed,
        "phones_scrubbed": cleaned.phones_scrubbed,
    }
    if not cleaned.text:
        return PreparedDocument(1, size, "empty", **counts)
    units = text_units(cleaned.text)
    reason = drop_reason(cleaned.text, units, config.quality)
    if reason is not None:
        return PreparedDocument(1, size, reason, **counts)
    signature = minhash_signature(units, config.dedup) if config.dedup.near else None
    return PreparedDocument(
        1, size, None, cleaned.text, content_hash(cleaned.text), signature, **counts
    )


def _decode(item: RawDocument, text_field: str) -> tuple[str | None, int, str | None]:
    """(text, input bytes, None), or (None, input bytes, reason) when there is no text."""
    if item.kind == "str":
        assert isinstance(item.payload, str)
        return item.payload, len(item.payload.encode("utf-8", "surrogatepass")), None
    assert isinstance(item.payload, bytes)
    size = len(item.payload)
    try:
        text = item.payload.decode("utf-8")
    except UnicodeDecodeError:
        return None, size, "invalid_utf8"
    if item.kind == "text":
        return text, size, None
    try:
        value = json.loads(text)
    except ValueError:
        return None, size, "bad_json"
    for key in text_field.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    if not isinstance(value, str):
        return None, size, "missing_field"
    return value, size, None
