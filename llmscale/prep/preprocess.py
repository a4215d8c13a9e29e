"""The corpus pipeline: inputs -> cleaned, deduplicated text -> a tokenizer (given or trained
on that text) -> Megatron indexed shards per dataset, with a report of what each stage kept.

Output folder:
    run.json                  the settings; a re-run with other settings is refused
    state.sqlite              dedup index and cleaning checkpoint
    cleaned/<dataset>/part-NNNNN.jsonl
    tokenizer.model           when trained here
    tokens/<dataset>/part-NNNNN.{bin,idx}, dataset.json   <- what `data.blend` names
    report.json
Every stage resumes: a killed run re-run skips finished work and ends with the same bytes.
"""

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmscale.data.blend import DATASET_METADATA
from llmscale.data.character_coverage import default_character_coverage
from llmscale.data.tokenizer import (
    SENTENCEPIECE_MODEL_TYPES,
    open_tokenizer,
    tokenizer_identity,
    train_sentencepiece_on_lines,
)
from llmscale.files import write_text_atomically
from llmscale.prep.clean_stage import DatasetSources, clean_corpus, cleaned_lines
from llmscale.prep.corpus_stats import DatasetStats, total
from llmscale.prep.dedup import DedupIndex
from llmscale.prep.prepare import PrepareConfig
from llmscale.prep.sources import find_sources
from llmscale.prep.tokenize_stage import (
    TokenizedPart,
    TokenizeTask,
    token_dtype,
    tokenize_parts,
)

DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class TokenizerTrainingConfig:
    vocab_size: int
    model_type: str = "bpe"
    # Below 1.0, the rarest characters are left to byte fallback instead of taking pieces:
    # SentencePiece's advice for Chinese, whose alphabet runs to thousands of characters.
    # None: chosen by the cleaned corpus's script (`default_character_coverage`).
    character_coverage: float | None = None
    byte_fallback: bool = True
    # Strings that become single pieces, e.g. chat markers.
    special_tokens: tuple[str, ...] = ()
    # Lines sampled for training from a corpus too large to hold; 0 trains on every line.
    max_sentences: int = 0

    def __post_init__(self) -> None:
        if self.model_type not in SENTENCEPIECE_MODEL_TYPES:
            raise ValueError(
                f"model_type must be one of {', '.join(SENTENCEPIECE_MODEL_TYPES)}, "
                f"got {self.model_type!r}."
            )


@dataclass(frozen=True)
class PreprocessConfig:
    # Dataset name -> input patterns (files, folders, globs, saved `datasets` folders).
    datasets: dict[str, tuple[str, ...]]
    output: Path
    # An existing tokenizer ("byte", a SentencePiece `.model`, a `tokenizer.json`), or None
    # to train one on the cleaned corpus with `train_tokenizer`.
    tokenizer: str | None = None
    train_tokenizer: TokenizerTrainingConfig | None = None
    # The end-of-document token of a `tokenizer.json` (found by name when None).
    eod_token: str | None = None
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    workers: int = 1
    # Cleaned text per part (and so per token shard).
    part_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        if (self.tokenizer is None) == (self.train_tokenizer is None):
            raise ValueError(
                "give either an existing tokenizer or settings to train one, not both."
            )
        if not self.datasets:
            raise ValueError("give at least one dataset of inputs.")
        for name in self.datasets:
            if not DATASET_NAME.fullmatch(name):
                raise ValueError(
                    f"dataset name {name!r} must start with a letter or digit and hold only "
                    f"letters, digits, '_', '.' and '-'."
                )
        if self.workers < 1 or self.part_bytes < 1:
            raise ValueError(
                f"workers and part_bytes must be >= 1, got {self.workers} and {self.part_bytes}."
            )


def run_preprocess(
    config: PreprocessConfig, root: Path, log: Callable[[str], None] = print
) -> dict:
    """Run (or resume) every stage; returns the report, also saved as `report.json`.

    Inputs that match nothing, a missing tokenizer and an output folder holding a run with
    other settings raise before any work starts.
    """
    datasets = [
        DatasetSources(name, tuple(find_sources(list(patterns), root, config.prepare.read)))
        for name, patterns in config.datasets.items()
    ]
    given = open_tokenizer(config.tokenizer, config.eod_token) if config.tokenizer else None
    output = config.output
    output.mkdir(parents=True, exist_ok=True)
    _claim_output(output, _settings(config, datasets, given))

    start = time.perf_counter()
    index = DedupIndex(output / "state.sqlite", config.prepare.dedup)
    try:
        cleaned = clean_corpus(
            datasets,
            config.prepare,
            output / "cleaned",
            index,
            config.workers,
            config.part_bytes,
            log,
        )
    finally:
        index.close()
    clean_seconds = time.perf_counter() - start
    log(
        f"cleaned: {sum(s.documents_kept for s in cleaned.stats.values()):,} documents kept "
        f"({clean_seconds:.1f} s)"
    )

    all_parts = [part for parts in cleaned.parts.values() for part in parts]
    tokenizer_spec = config.tokenizer or str(_trained_tokenizer(config, output, all_parts, log))
    tokenizer = given or open_tokenizer(tokenizer_spec, config.eod_token)
    identity = tokenizer_identity(tokenizer)

    tasks = [
        TokenizeTask(part, output / "tokens" / name / part.stem, tokenizer_spec, config.eod_token)
        for name, parts in cleaned.parts.items()
        for part in parts
    ]
    start = time.perf_counter()
    tokenized = tokenize_parts(tasks, config.workers)
    tokenize_seconds = time.perf_counter() - start

    report = {
        "output": str(output),
        "datasets": _dataset_reports(output, cleaned.stats, tasks, tokenized, identity),
        "total": total(list(cleaned.stats.values())).to_dict(),
        "near_duplicate_clusters": cleaned.near_duplicate_clusters,
        "tokenizer": {**identity, "spec": tokenizer_spec},
        "stages": {
            "clean": {"seconds": round(clean_seconds, 3)},
            "tokenize": _tokenize_report(tokenized, tokenize_seconds, config.workers),
        },
    }
    _write_json(output / "report.json", report)
    return report


def _dataset_reports(
    output: Path,
    stats: dict[str, DatasetStats],
    tasks: list[TokenizeTask],
    tokenized: list[TokenizedPart],
    identity: dict,
) -> dict:
    """Per dataset, its counts (tokens filled in here) and where its shards are; also writes
    each dataset's metadata file beside its shards."""
    reports = {}
    for name, dataset_stats in stats.items():
        folder = output / "tokens" / name
        parts = [part for task, part in zip(tasks, tokenized) if task.prefix.parent == folder]
        dataset_stats.tokens = sum(part.tokens for part in parts)
        _write_metadata(folder, identity, parts)
        reports[name] = {**dataset_stats.to_dict(), "token_shards": len(parts), "path": str(folder)}
    return reports


def _tokenize_report(tokenized: list[TokenizedPart], seconds: float, workers: int) -> dict:
    """Speed of the shards written by this run (finished shards found on disk are not timed)."""
    written = sum(part.tokens for part in tokenized if part.written)
    return {
        "workers": workers,
        "shards_written": sum(part.written for part in tokenized),
        "tokens_written": written,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(written / seconds) if written else 0,
    }


def _trained_tokenizer(
    config: PreprocessConfig, output: Path, parts: list[Path], log: Callable[[str], None]
) -> Path:
    model = output / "tokenizer.model"
    if model.is_file():
        return model
    training = config.train_tokenizer
    assert training is not None
    start = time.perf_counter()
    coverage = training.character_coverage
    if coverage is None:
        coverage = default_character_coverage(parts)
    # Trained under a temporary prefix and renamed, so a model file is always a finished one.
    temporary = train_sentencepiece_on_lines(
        cleaned_lines(parts),
        output / "tokenizer.tmp",
        training.vocab_size,
        model_type=training.model_type,
        character_coverage=coverage,
        byte_fallback=training.byte_fallback,
        special_tokens=training.special_tokens,
        max_sentences=training.max_sentences,
        source="the cleaned corpus",
    )
    os.replace(temporary.with_suffix(".vocab"), output / "tokenizer.vocab")
    os.replace(temporary, model)
    log(
        f"tokenizer: trained {training.vocab_size} pieces at character coverage {coverage} "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return model


def _settings(config: PreprocessConfig, datasets: list[DatasetSources], given) -> dict:
    """Everything the output bytes depend on (not `workers`, which changes only speed)."""
    return {
        "datasets": {
            d.name: [[str(source), _size(source)] for source in d.sources] for d in datasets
        },
        "tokenizer": tokenizer_identity(given) if given else asdict(config.train_tokenizer),
        "eod_token": config.eod_token,
        "prepare": asdict(config.prepare),
        "part_bytes": config.part_bytes,
    }


def _size(source: Path) -> int:
    if source.is_file():
        return source.stat().st_size
    return sum(file.stat().st_size for file in source.rglob("*") if file.is_file())


def _claim_output(output: Path, settings: dict) -> None:
    """Record the run's settings, or check that the run found in `output` had the same."""
    path = output / "run.json"
    settings = json.loads(json.dumps(settings))
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = sorted(
            key
            for key in settings.keys() | previous.keys()
            if settings.get(key) != previous.get(key)
        )
        if changed:
            raise ValueError(
                f"output folder {output} holds a run with other settings ({', '.join(changed)} "
                f"differ); resume it with the same settings, or choose a new --output."
            )
        return
    _write_json(path, settings)


def _write_metadata(folder: Path, identity: dict, parts: list[TokenizedPart]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = identity["vocab_size"]
    assert isinstance(vocab_size, int)
    _write_json(
        folder / DATASET_METADATA,
        {
            "tokenizer": identity,
            "dtype": token_dtype(vocab_size).__name__,
            "documents": sum(part.documents for part in parts),
            "tokens": sum(part.tokens for part in parts),
            "shards": [
                {"prefix": part.prefix.name, "documents": part.documents, "tokens": part.tokens}
                for part in parts
            ],
        },
    )


def _write_json(path: Path, value: dict) -> None:
    write_text_atomically(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")
