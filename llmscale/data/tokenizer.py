"""Tokenizers: a byte-level fallback that needs no files, and trained SentencePiece models."""

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import sentencepiece

from llmscale.config.schema import TokenizerConfig, TokenizerKind

TRAIN_HINT = (
    "train one with `python tools/train_tokenizer.py --input data/shakespeare --vocab-size 4000 "
    "--output tokenizers/shakespeare`"
)
SENTENCEPIECE_MODEL_TYPES = ("bpe", "unigram")


class Tokenizer(Protocol):
    vocab_size: int
    # End-of-document id, appended after every document so the model learns where texts end.
    eod_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus one end-of-document id; works on any text with no training."""

    vocab_size: int = 257
    eod_id: int = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # A sampled sequence may stop inside a multi-byte character, so bad bytes become U+FFFD.
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A trained SentencePiece `.model`; its end-of-sentence piece serves as end of document."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model {path} does not exist; {TRAIN_HINT}.")
        try:
            self._processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as error:
            raise ValueError(
                f"{path} is not a valid SentencePiece model ({error}); {TRAIN_HINT}."
            ) from None
        eos_id = self._processor.eos_id()
        if eos_id < 0:
            raise ValueError(
                f"SentencePiece model {path} defines no end-of-sentence piece, which llmscale "
                f"uses to separate documents; {TRAIN_HINT} (it always defines one)."
            )
        self.path = path
        self.vocab_size: int = self._processor.get_piece_size()
        self.eod_id: int = eos_id

    def encode(self, text: str) -> list[int]:
        return self._processor.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._processor.decode(list(ids))


def build_tokenizer(cfg: TokenizerConfig, root: Path) -> Tokenizer:
    """The tokenizer `cfg` names; a relative `tokenizer.path` resolves against `root`."""
    kind = TokenizerKind(cfg.kind)
    if kind is TokenizerKind.byte:
        return ByteTokenizer()
    if cfg.path is None:
        raise ValueError(
            f"tokenizer.kind=sentencepiece needs tokenizer.path set to a .model file; {TRAIN_HINT}."
        )
    path = Path(cfg.path).expanduser()
    return SentencePieceTokenizer(path if path.is_absolute() else root / path)


def train_sentencepiece(
    inputs: list[Path],
    output_prefix: Path,
    vocab_size: int,
    model_type: str = "bpe",
    character_coverage: float = 1.0,
    byte_fallback: bool = True,
) -> Path:
    """Train a SentencePiece model on the lines of `inputs`; returns `<output_prefix>.model`.

    The result is deterministic for given inputs and settings, and decoding gives back the
    encoded text exactly (no Unicode normalisation, whitespace kept).
    """
    if model_type not in SENTENCEPIECE_MODEL_TYPES:
        choices = ", ".join(SENTENCEPIECE_MODEL_TYPES)
        raise ValueError(f"model_type must be one of {choices}, got {model_type!r}.")
    if not 0.0 < character_coverage <= 1.0:
        raise ValueError(f"character_coverage must be in (0, 1], got {character_coverage}.")
    if not inputs:
        raise ValueError("train_sentencepiece needs at least one input file.")
    for path in inputs:
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer training input {path} is not a file.")
    output_prefix.parent.mkdir(parents=True, exist_ok=True)

    lines = _LineReader(inputs)
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_prefix=str(output_prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            # Train on every line in file order: sampling would make small corpora depend on a seed.
            input_sentence_size=0,
            shuffle_input_sentence=False,
            # Pretraining text must round-trip exactly, so no NFKC and no collapsing of spaces.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            # Training lines come without "\n", so it gets its own piece to stay encodable.
            user_defined_symbols=["\n"],
            minloglevel=2,
        )
    except RuntimeError as error:
        if lines.non_empty_lines == 0:
            names = [str(path) for path in inputs]
            raise ValueError(f"tokenizer training inputs {names} contain no text.") from None
        # Drop the C++ source location and check expression; SentencePiece's own words name the fix.
        reason = str(error).rsplit("] ", 1)[-1].rstrip(".")
        raise ValueError(f"SentencePiece training failed: {reason}.") from None
    return output_prefix.with_name(output_prefix.name + ".model")


class _LineReader:
    """Streams the input files line by line, counting text so an empty corpus gets a clear error."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.non_empty_lines = 0

    def __iter__(self) -> Iterator[str]:
        for path in self.paths:
            with path.open(encoding="utf-8", errors="replace") as file:
                for line in file:
                    line = line.rstrip("\n")
                    if line:
                        self.non_empty_lines += 1
                        yield line
