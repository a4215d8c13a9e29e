"""Clean, deduplicate and tokenize a corpus into Megatron indexed shards for llmscale.

    python tools/preprocess_data.py --input data/shakespeare --output prepared/shakespeare \\
        --vocab-size 4000

    python tools/preprocess_data.py --input en=corpora/en/*.jsonl zh=corpora/zh.parquet \\
        --output prepared/web --tokenizer tokenizers/web.model --workers 8

Inputs are plain text, JSON lines (.jsonl/.json, optionally .gz), parquet, or folders written
by `datasets.save_to_disk`; NAME=PATTERN puts inputs into a named dataset (default: corpus).
Point `data.blend` entries at `<output>/tokens/<dataset>`. A killed run, re-run with the same
arguments, resumes where it stopped. The report is printed and saved as <output>/report.json.
"""

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from llmscale.data.tokenizer import SENTENCEPIECE_MODEL_TYPES
from llmscale.prep.cleaning import UNICODE_FORMS, CleaningConfig
from llmscale.prep.dedup import DedupConfig
from llmscale.prep.prepare import PrepareConfig
from llmscale.prep.preprocess import (
    PreprocessConfig,
    TokenizerTrainingConfig,
    run_preprocess,
)
from llmscale.prep.quality import LANGUAGES, QualityConfig
from llmscale.prep.sources import TEXT_DOCUMENT_UNITS, ReadConfig

DEFAULT_DATASET = "corpus"


def _defaults(config_class: type) -> dict:
    return {item.name: item.default for item in fields(config_class)}


def build_parser() -> argparse.ArgumentParser:
    read, clean, quality = (
        _defaults(ReadConfig),
        _defaults(CleaningConfig),
        _defaults(QualityConfig),
    )
    dedup, training = _defaults(DedupConfig), _defaults(TokenizerTrainingConfig)
    run = _defaults(PreprocessConfig)
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--input",
        nargs="+",
        action="extend",
        required=True,
        metavar="[NAME=]PATTERN",
        help="files, folders or globs, per dataset",
    )
    parser.add_argument("--output", type=Path, required=True, help="output folder")
    parser.add_argument("--workers", type=int, default=run["workers"], help="worker processes")
    parser.add_argument(
        "--shard-size-mb",
        type=float,
        default=run["part_bytes"] / 2**20,
        help="cleaned text per shard",
    )

    group = parser.add_argument_group("tokenizer (--tokenizer, or --vocab-size to train one)")
    group.add_argument("--tokenizer", help="'byte', a SentencePiece .model or a tokenizer.json")
    group.add_argument("--eod-token", help="end-of-document token of a tokenizer.json")
    group.add_argument("--vocab-size", type=int, help="train a SentencePiece model of this size")
    group.add_argument(
        "--model-type",
        choices=SENTENCEPIECE_MODEL_TYPES,
        default=training["model_type"],
        help="SentencePiece algorithm",
    )
    group.add_argument(
        "--character-coverage",
        type=float,
        default=training["character_coverage"],
        help="share of characters given pieces of their own "
        "(default: 0.9995 for CJK-heavy text, 1.0 otherwise)",
    )
    group.add_argument(
        "--no-byte-fallback",
        action="store_true",
        help="map unseen characters to <unk> instead of their UTF-8 bytes",
    )
    group.add_argument("--special-tokens", nargs="*", default=[], help="extra single pieces")
    group.add_argument(
        "--tokenizer-max-sentences",
        type=int,
        default=training["max_sentences"],
        help="lines sampled for training (0: every line)",
    )

    group = parser.add_argument_group("reading")
    group.add_argument(
        "--json-field",
        default=read["text_field"],
        help="field holding the text (JSON lines, parquet, saved datasets)",
    )
    group.add_argument(
        "--text-document",
        choices=TEXT_DOCUMENT_UNITS,
        default=read["text_document"],
        help="a plain-text document is a whole file (cut at paragraph breaks when over "
        "--max-chars), a paragraph, or a line",
    )
    group.add_argument(
        "--dataset-split", default=read["dataset_split"], help="split read from a saved DatasetDict"
    )

    group = parser.add_argument_group("cleaning and quality filters")
    group.add_argument(
        "--unicode-form",
        choices=UNICODE_FORMS,
        default=clean["unicode_form"],
        help="NFKC also folds full-width and other compatibility characters",
    )
    group.add_argument("--scrub-pii", action="store_true", help="replace e-mails and phone numbers")
    group.add_argument(
        "--min-chars", type=int, default=quality["min_chars"], help="shortest document kept"
    )
    group.add_argument(
        "--max-chars", type=int, default=quality["max_chars"], help="longest document kept"
    )
    group.add_argument(
        "--min-alnum-ratio",
        type=float,
        default=quality["min_alnum_ratio"],
        help="least share of letters and digits among non-space characters",
    )
    group.add_argument(
        "--max-symbol-ratio",
        type=float,
        default=quality["max_symbol_ratio"],
        help="most share of symbols (neither letters, digits nor punctuation)",
    )
    group.add_argument(
        "--max-repeated-line-ratio",
        type=float,
        default=quality["max_repeated_line_ratio"],
        help="most share of characters in lines repeating an earlier line",
    )
    group.add_argument(
        "--max-repeated-ngram-ratio",
        type=float,
        default=quality["max_repeated_ngram_ratio"],
        help="most share of n-grams repeating an earlier one",
    )
    group.add_argument(
        "--ngram-size",
        type=int,
        default=quality["ngram_size"],
        help="n of --max-repeated-ngram-ratio, in words (Chinese: characters)",
    )
    group.add_argument(
        "--languages",
        nargs="*",
        choices=LANGUAGES,
        default=list(quality["languages"]),
        help="languages kept; give the flag with none to keep every language",
    )

    group = parser.add_argument_group("deduplication")
    group.add_argument(
        "--no-exact-dedup", action="store_true", help="keep copies of an earlier document"
    )
    group.add_argument(
        "--near-dup-threshold",
        type=float,
        default=dedup["near_threshold"],
        help="Jaccard similarity of a near duplicate (0: off)",
    )
    group.add_argument(
        "--num-perm", type=int, default=dedup["num_perm"], help="MinHash permutations"
    )
    group.add_argument(
        "--shingle-size",
        type=int,
        default=dedup["shingle_size"],
        help="words (Chinese: characters) per MinHash shingle",
    )
    return parser


def parse_datasets(entries: list[str]) -> dict[str, tuple[str, ...]]:
    datasets: dict[str, list[str]] = {}
    for entry in entries:
        name, separator, pattern = entry.partition("=")
        if not separator:
            name, pattern = DEFAULT_DATASET, entry
        if not pattern:
            raise ValueError(f"--input entry {entry!r} names a dataset but no files.")
        datasets.setdefault(name, []).append(pattern)
    return {name: tuple(patterns) for name, patterns in datasets.items()}


def build_config(args: argparse.Namespace) -> PreprocessConfig:
    """The run's settings; ValueError names the flag of a bad value."""
    if (args.tokenizer is None) == (args.vocab_size is None):
        raise ValueError(
            "give --tokenizer (an existing tokenizer) or --vocab-size (train one), exactly one."
        )
    training = None
    if args.vocab_size is not None:
        training = TokenizerTrainingConfig(
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            character_coverage=args.character_coverage,
            byte_fallback=not args.no_byte_fallback,
            special_tokens=tuple(args.special_tokens),
            max_sentences=args.tokenizer_max_sentences,
        )
    prepare = PrepareConfig(
        read=ReadConfig(args.json_field, args.text_document, args.dataset_split),
        cleaning=CleaningConfig(args.unicode_form, args.scrub_pii),
        quality=QualityConfig(
            min_chars=args.min_chars,
            max_chars=args.max_chars,
            min_alnum_ratio=args.min_alnum_ratio,
            max_symbol_ratio=args.max_symbol_ratio,
            max_repeated_line_ratio=args.max_repeated_line_ratio,
            max_repeated_ngram_ratio=args.max_repeated_ngram_ratio,
            ngram_size=args.ngram_size,
            languages=tuple(args.languages),
        ),
        dedup=DedupConfig(
            exact=not args.no_exact_dedup,
            near_threshold=args.near_dup_threshold,
            num_perm=args.num_perm,
            shingle_size=args.shingle_size,
        ),
    )
    if args.shard_size_mb <= 0:
        raise ValueError(f"--shard-size-mb must be > 0, got {args.shard_size_mb}.")
    return PreprocessConfig(
        datasets=parse_datasets(args.input),
        output=args.output,
        tokenizer=args.tokenizer,
        train_tokenizer=training,
        eod_token=args.eod_token,
        prepare=prepare,
        workers=args.workers,
        part_bytes=int(args.shard_size_mb * 2**20),
    )


def describe(report: dict) -> str:
    lines = []
    for name, stats in report["datasets"].items():
        lines.append(
            f"{name}: {stats['documents_in']:,} documents ({stats['bytes_in']:,} bytes) in, "
            f"{stats['documents_kept']:,} kept ({stats['bytes_kept']:,} bytes), "
            f"{stats['tokens']:,} tokens in {stats['token_shards']} shards -> {stats['path']}"
        )
        for reason, count in sorted(stats["dropped"].items()):
            lines.append(f"  dropped {reason}: {count:,}")
    tokenize = report["stages"]["tokenize"]
    lines.append(f"near-duplicate clusters: {report['near_duplicate_clusters']:,}")
    lines.append(
        f"tokenize: {tokenize['tokens_written']:,} tokens in {tokenize['seconds']:.1f} s "
        f"({tokenize['tokens_per_second']:,} tokens/s, {tokenize['workers']} workers)"
    )
    lines.append(f"report: {Path(report['output']) / 'report.json'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = build_config(args)
        report = run_preprocess(config, Path.cwd())
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    print(describe(report))


if __name__ == "__main__":
    main()
