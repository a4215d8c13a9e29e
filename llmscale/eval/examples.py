"""Evaluation examples from local JSONL files, checked line by line: an unusable line is an
error that names the file and the line, never a silently skipped example."""

import json
from pathlib import Path
from typing import Callable, List, TypeVar

T = TypeVar("T")


def read_jsonl(path: Path, parse: Callable[[dict], T], limit: int = 0) -> List[T]:
    """`parse` each line's object (raising ValueError on bad content); blank lines are skipped;
    `limit` > 0 keeps the first that many examples."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such examples file")
    examples: List[T] = []
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
                examples.append(parse(record))
            except ValueError as error:  # json's JSONDecodeError is a ValueError too
                raise ValueError(f"{path}, line {number}: {error}") from None
            if limit and len(examples) == limit:
                break
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def text_field(record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string, got {value!r} (keys: {sorted(record)})")
    return value
