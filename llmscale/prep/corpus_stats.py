"""What the preprocessing stages kept and dropped, per dataset, for the run report."""

from dataclasses import asdict, dataclass, field

from llmscale.prep.prepare import PreparedDocument


@dataclass
class DatasetStats:
    documents_in: int = 0
    bytes_in: int = 0
    # Documents dropped, by reason: unreadable input, a quality filter, or deduplication.
    dropped: dict[str, int] = field(default_factory=dict)
    documents_kept: int = 0
    # UTF-8 bytes of the cleaned text kept.
    bytes_kept: int = 0
    # Terminal escape sequences (colours, titles) removed from the text, kept or dropped.
    terminal_escapes_removed: int = 0
    emails_scrubbed: int = 0
    phones_scrubbed: int = 0
    tokens: int = 0

    def record(self, document: PreparedDocument, reason: str | None, kept_bytes: int) -> None:
        """Count `document`, dropped for `reason` or (None) kept with `kept_bytes` of text."""
        self.documents_in += document.documents
        self.bytes_in += document.size_bytes
        self.terminal_escapes_removed += document.terminal_escapes_removed
        self.emails_scrubbed += document.emails_scrubbed
        self.phones_scrubbed += document.phones_scrubbed
        if reason is None:
            self.documents_kept += 1
            self.bytes_kept += kept_bytes
        else:
            self.dropped[reason] = self.dropped.get(reason, 0) + document.documents

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "DatasetStats":
        return cls(**values)


def total(stats: list[DatasetStats]) -> DatasetStats:
    """All datasets' counts added up."""
    summed = DatasetStats()
    for item in stats:
        for name, value in item.to_dict().items():
            if name == "dropped":
                for reason, count in value.items():
                    summed.dropped[reason] = summed.dropped.get(reason, 0) + count
            else:
                setattr(summed, name, getattr(summed, name) + value)
    return summed
