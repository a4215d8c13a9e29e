"""Train a SentencePiece tokenizer for llmscale.

    python tools/train_tokenizer.py --input data/shakespeare --vocab-size 4000 \\
        --output tokenizers/shakespeare

writes tokenizers/shakespeare.model (and .vocab); point `tokenizer.path` at the .model file.
"""

import argparse
import importlib.util
import sys
from pathlib import Path

# Run as a script from a checkout, the repo root is not on sys.path unless llmscale is installed.
if importlib.util.find_spec("llmscale") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmscale.data.corpus import resolve_paths  # noqa: E402
from llmscale.data.tokenizer import SENTENCEPIECE_MODEL_TYPES, train_sentencepiece  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a SentencePiece tokenizer on text files.")
    parser.add_argument(
        "--input", nargs="+", required=True, help="text files, directories or glob patterns"
    )
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--model-type", choices=SENTENCEPIECE_MODEL_TYPES, default="bpe")
    parser.add_argument(
        "--character-coverage",
        type=float,
        help="fraction of characters that get their own piece "
        "(default: 0.9995 for CJK-heavy text, 1.0 otherwise)",
    )
    parser.add_argument(
        "--no-byte-fallback",
        action="store_true",
        help="map unseen characters to <unk> instead of their UTF-8 bytes",
    )
    parser.add_argument(
        "--special-tokens",
        nargs="*",
        default=[],
        help="extra single pieces, e.g. '<mask>' for masked-LM training",
    )
    parser.add_argument(
        "--output", type=Path, required=True, help="output prefix, e.g. tokenizers/shakespeare"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        inputs = resolve_paths(args.input, Path.cwd(), source="--input")
        model_path = train_sentencepiece(
            inputs,
            args.output,
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            character_coverage=args.character_coverage,
            byte_fallback=not args.no_byte_fallback,
            special_tokens=args.special_tokens,
        )
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    print(f"Trained a {args.vocab_size}-piece {args.model_type} tokenizer on {len(inputs)} files.")
    print(f"Model: {model_path}")
    print(f"Use it with: tokenizer.kind=sentencepiece tokenizer.path={model_path}")


if __name__ == "__main__":
    main()
