"""Tokenizers: a byte-level fallback that needs no files, trained SentencePiece models, and
existing Hugging Face `tokenizer.json` files."""

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import sentencepiece
import tokenizers

from llmscale.config.schema import TokenizerConfig, TokenizerKind
from llmscale.data.character_coverage import default_character_coverage

TRAIN_HINT = (
    "train one with `python tools/train_tokenizer.py --input data/shakespeare --vocab-size 4000 "
    "--output tokenizers/shakespeare`"
)
SENTENCEPIECE_MODEL_TYPES = ("bpe", "unigram")
# End-of-text tokens of common tokenizer.json files, tried in order when none is named.
HF_EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")
# The masked-LM mask token: the piece SentencePiece training adds (`--special-tokens '<mask>'`),
# and with BERT's spelling the one a tokenizer.json may define.
MASK_TOKEN = "<mask>"
HF_MASK_CANDIDATES = (MASK_TOKEN, "[MASK]")
# SentencePiece's refusal when the characters to cover (and the special and byte pieces) need
# more pieces than the vocabulary has: "... required_chars. 4000 vs 5129. ...".
_TOO_MANY_CHARACTERS = re.compile(r"smaller than required_chars\. \d+ vs (\d+)")


class Tokenizer(Protocol):
    vocab_size: int
    # End-of-document id, appended after every document so the model learns where texts end.
    eod_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus one end-of-document id; works on any text with no training.
    `with_mask` reserves one more id, 257, as the masked-LM mask token (which no text encodes
    to, so ids prepared without it mean the same)."""

    eod_id: int = 256

    def __init__(self, with_mask: bool = False) -> None:
        self.vocab_size: int = 258 if with_mask else 257
        self.mask_id: int | None = 257 if with_mask else None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(text.encode("utf-8")) for text in texts]

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
        mask_id = self._processor.piece_to_id(MASK_TOKEN)
        self.mask_id: int | None = None if mask_id == self._processor.unk_id() else mask_id

    def encode(self, text: str) -> list[int]:
        return self._processor.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # One thread: parallelism comes from worker processes, each measured against one core.
        return self._processor.encode(list(texts), num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        return self._processor.decode(list(ids))

    def pieces(self) -> list[str]:
        return [self._processor.id_to_piece(i) for i in range(self.vocab_size)]


class HuggingFaceTokenizer:
    """An existing Hugging Face `tokenizer.json`; `eod_token` (or the first of
    HF_EOD_CANDIDATES it defines) separates documents."""

    def __init__(self, path: Path, eod_token: str | None = None) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"Hugging Face tokenizer file {path} does not exist.")
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:  # the Rust side raises plain Exception for any bad file
            raise ValueError(f"{path} is not a valid tokenizer.json ({error}).") from None
        candidates = (eod_token,) if eod_token else HF_EOD_CANDIDATES
        found = [self._tokenizer.token_to_id(token) for token in candidates]
        ids = [token_id for token_id in found if token_id is not None]
        if not ids:
            raise ValueError(
                f"{path} defines none of the end-of-document tokens {list(candidates)}; name the "
                f"one it uses (e.g. --eod-token '<|endoftext|>')."
            )
        self.path = path
        self.vocab_size: int = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.eod_id: int = ids[0]
        self.mask_id: int | None = self._mask_id(path)

    def _mask_id(self, path: Path) -> int | None:
        """The `mask_token` of the `tokenizer_config.json` beside, else the first of
        HF_MASK_CANDIDATES the vocabulary holds."""
        config = path.parent / "tokenizer_config.json"
        named = json.loads(config.read_text()).get("mask_token") if config.is_file() else None
        if isinstance(named, dict):
            named = named.get("content")
        for token in (named,) if named else HF_MASK_CANDIDATES:
            token_id = self._tokenizer.token_to_id(token)
            if token_id is not None:
                return token_id
        return None

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        kept = [i for i in ids if i != self.eod_id]
        return self._tokenizer.decode(kept, skip_special_tokens=False)

    def pieces(self) -> list[str]:
        by_id = {i: token for token, i in self._tokenizer.get_vocab(with_added_tokens=True).items()}
        return [by_id.get(i, "") for i in range(self.vocab_size)]


def mask_token_id(tokenizer: Tokenizer) -> int:
    """The id of the tokenizer's masked-LM mask token, or an error saying how to get one."""
    mask_id = getattr(tokenizer, "mask_id", None)
    if mask_id is not None:
        return mask_id
    if isinstance(tokenizer, ByteTokenizer):
        how = "open the byte tokenizer with ByteTokenizer(with_mask=True), which reserves id 257"
    elif isinstance(tokenizer, SentencePieceTokenizer):
        how = (f"{tokenizer.path} has no {MASK_TOKEN!r} piece: train one with it, "
               f"`python tools/train_tokenizer.py ... --special-tokens '{MASK_TOKEN}'`")
    else:
        how = (f"{getattr(tokenizer, 'path', 'it')} defines none of {list(HF_MASK_CANDIDATES)} "
               "and no `mask_token` in the tokenizer_config.json beside it: add one as a "
               "special token")
    raise ValueError(f"the tokenizer has no mask token: {how}.")


def open_tokenizer(spec: str, eod_token: str | None = None) -> Tokenizer:
    """`"byte"`, a SentencePiece `.model` file, or a Hugging Face `tokenizer.json` file."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.suffix == ".json":
        return HuggingFaceTokenizer(path, eod_token)
    return SentencePieceTokenizer(path)


def tokenizer_identity(tokenizer: Tokenizer) -> dict[str, object]:
    """What a token id means: the tokenizer's kind, a digest of its vocabulary (id -> piece),
    its size and its document separator. Recorded beside prepared datasets so training refuses
    ids from a different vocabulary. The digest covers the pieces, not the file, whose bytes
    also hold training details (the output path, the thread count)."""
    pieces = tokenizer.pieces() if hasattr(tokenizer, "pieces") else None
    digest = hashlib.sha256("\0".join(pieces).encode("utf-8")).hexdigest() if pieces else None
    return {
        "kind": type(tokenizer).__name__,
        "vocab_sha256": digest,
        "vocab_size": tokenizer.vocab_size,
        "eod_id": tokenizer.eod_id,
    }


def build_tokenizer(cfg: TokenizerConfig, root: Path, masked_lm: bool = False) -> Tokenizer:
    """The tokenizer `cfg` names; a relative `tokenizer.path` resolves against `root`. For
    masked-LM training the byte tokenizer reserves its mask id (other kinds define their own)."""
    kind = TokenizerKind(cfg.kind)
    if kind is TokenizerKind.byte:
        return ByteTokenizer(with_mask=masked_lm)
    if cfg.path is None:
        if kind is TokenizerKind.huggingface:
            raise ValueError("tokenizer.kind=huggingface needs tokenizer.path set to a "
                             "tokenizer.json file.")
        raise ValueError(
            f"tokenizer.kind=sentencepiece needs tokenizer.path set to a .model file; {TRAIN_HINT}."
        )
    path = Path(cfg.path).expanduser()
    path = path if path.is_absolute() else root / path
    if kind is TokenizerKind.huggingface:
        return HuggingFaceTokenizer(path)
    return SentencePieceTokenizer(path)


def train_sentencepiece(
    inputs: list[Path],
    output_prefix: Path,
    vocab_size: int,
    model_type: str = "bpe",
    character_coverage: float | None = None,
    byte_fallback: bool = True,
    special_tokens: Sequence[str] = (),
) -> Path:
    """Train a SentencePiece model on the lines of `inputs`; returns `<output_prefix>.model`.

    The result is deterministic for given inputs and settings, and decoding gives back the
    encoded text exactly (no Unicode normalisation, whitespace kept). Character coverage None
    is chosen by the inputs' script (`default_character_coverage`).
    """
    if not inputs:
        raise ValueError("train_sentencepiece needs at least one input file.")
    for path in inputs:
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer training input {path} is not a file.")
    names = [str(path) for path in inputs]
    if character_coverage is None:
        character_coverage = default_character_coverage(inputs)
    return train_sentencepiece_on_lines(
        _file_lines(inputs),
        output_prefix,
        vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=byte_fallback,
        special_tokens=special_tokens,
        source=f"tokenizer training inputs {names}",
    )


def train_sentencepiece_on_lines(
    lines: Iterable[str],
    output_prefix: Path,
    vocab_size: int,
    model_type: str = "bpe",
    character_coverage: float = 1.0,
    byte_fallback: bool = True,
    special_tokens: Sequence[str] = (),
    max_sentences: int = 0,
    seed: int = 0,
    source: str = "tokenizer training text",
) -> Path:
    """Train on `lines` (without their newlines); returns `<output_prefix>.model`.

    `special_tokens` become single pieces that encode and decode as themselves.
    `max_sentences` > 0 trains on that many lines sampled (by `seed`) from a stream too large to
    hold; 0 trains on every line in order, which makes small corpora independent of any seed.
    """
    if model_type not in SENTENCEPIECE_MODEL_TYPES:
        choices = ", ".join(SENTENCEPIECE_MODEL_TYPES)
        raise ValueError(f"model_type must be one of {choices}, got {model_type!r}.")
    if not 0.0 < character_coverage <= 1.0:
        raise ValueError(f"character_coverage must be in (0, 1], got {character_coverage}.")
    if max_sentences < 0:
        raise ValueError(f"max_sentences must be >= 0, got {max_sentences}.")
    output_prefix.parent.mkdir(parents=True, exist_ok=True)

    counted = _NonEmptyLines(lines)
    sentencepiece.set_random_generator_seed(seed)
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(counted),
            model_prefix=str(output_prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=max_sentences > 0,
            # Pretraining text must round-trip exactly, so no NFKC and no collapsing of spaces.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            # Training lines come without "\n", so it gets its own piece to stay encodable.
            user_defined_symbols=["\n", *special_tokens],
            minloglevel=2,
        )
    except RuntimeError as error:
        if counted.count == 0:
            raise ValueError(f"{source} contain no text.") from None
        # Drop the C++ source location and check expression; SentencePiece's own words name the fix.
        reason = str(error).rsplit("] ", 1)[-1].rstrip(".")
        too_many_characters = _TOO_MANY_CHARACTERS.search(reason)
        if too_many_characters:
            # SentencePiece names its own flags (--character_coverage); name the tools' instead.
            reason = (
                f"--vocab-size {vocab_size} is smaller than the {too_many_characters[1]} pieces "
                f"needed by the characters that --character-coverage {character_coverage} "
                "covers, plus the special and byte pieces; raise --vocab-size or lower "
                "--character-coverage (0.9995 suits Chinese)"
            )
        raise ValueError(f"SentencePiece training failed: {reason}.") from None
    return output_prefix.with_name(output_prefix.name + ".model")


def _file_lines(paths: list[Path]) -> Iterator[str]:
    for path in paths:
        with path.open(encoding="utf-8", errors="replace") as file:
            for line in file:
                yield line.rstrip("\n")


class _NonEmptyLines:
    """Passes on the non-empty lines, counting them so an empty corpus gets a clear error."""

    def __init__(self, lines: Iterable[str]) -> None:
        self.lines = lines
        self.count = 0

    def __iter__(self) -> Iterator[str]:
        for line in self.lines:
            if line:
                self.count += 1
                yield line
