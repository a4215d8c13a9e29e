"""From `data.paths` to fixed-length training samples: file discovery, tokenizing, packing."""

import glob
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from llmscale.data.tokenizer import Tokenizer

GLOB_CHARACTERS = ("*", "?", "[")


def resolve_paths(patterns: list[str], root: Path, source: str = "data.paths") -> list[Path]:
    """The files named by `patterns` (files, directories, globs; relative to `root`), sorted.

    A directory stands for every regular file under it. `source` is the setting the patterns
    came from, named in the error for a pattern that matches nothing.
    """
    files: set[Path] = set()
    for pattern in patterns:
        expanded = Path(pattern).expanduser()
        path = expanded if expanded.is_absolute() else root / expanded
        if any(character in pattern for character in GLOB_CHARACTERS):
            # Globbing relative to root_dir keeps brackets or stars in `root` itself literal.
            found_names = glob.glob(str(expanded), root_dir=root, recursive=True)
            matches = [root / name for name in found_names]
        else:
            matches = [path]
        found = [file for match in matches for file in _files_under(match)]
        if not found:
            raise FileNotFoundError(
                f"{source} entry {pattern!r} matches no file (looked for {path.absolute()}); "
                f"fix or remove it in {source}. Relative paths resolve against {root.absolute()}."
            )
        files.update(file.resolve() for file in found)
    return sorted(files)


def _files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(file for file in path.rglob("*") if file.is_file())
    return []


def load_token_stream(paths: Sequence[Path], tokenizer: Tokenizer) -> Tensor:
    """All files as one 1-D int64 stream; each file is a document, followed by the EOD id."""
    ids: list[int] = []
    for path in paths:
        ids.extend(tokenizer.encode(path.read_text(encoding="utf-8", errors="replace")))
        ids.append(tokenizer.eod_id)
    return torch.tensor(ids, dtype=torch.int64)


def split_train_val(tokens: Tensor, val_fraction: float) -> tuple[Tensor, Tensor]:
    """(train, validation), validation being the last `val_fraction` of the stream (no overlap)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}.")
    num_val = int(tokens.numel() * val_fraction)
    split = tokens.numel() - num_val
    return tokens[:split], tokens[split:]


class PackedDataset(Dataset[tuple[Tensor, Tensor]]):
    """Consecutive windows of `seq_len + 1` tokens that share their boundary token.

    Sample i is (input_ids, labels) with labels one position ahead of input_ids; documents are
    packed across window boundaries, separated by their EOD ids.
    """

    def __init__(self, tokens: Tensor, seq_len: int, name: str = "token stream") -> None:
        if tokens.dim() != 1:
            raise ValueError(
                f"{name} must be a 1-D tensor of token ids, got shape {tuple(tokens.shape)}."
            )
        if seq_len < 1:
            raise ValueError(f"data.seq_len must be at least 1, got {seq_len}.")
        if tokens.numel() < seq_len + 1:
            raise ValueError(
                f"{name} has {tokens.numel()} tokens, fewer than the {seq_len + 1} one sample of "
                f"data.seq_len={seq_len} needs; lower data.seq_len, add text to data.paths, or "
                f"(for the validation split) raise data.val_fraction."
            )
        self.tokens = tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        return (self.tokens.numel() - 1) // self.seq_len

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} is out of range for {len(self)} samples.")
        start = index * self.seq_len
        window = self.tokens[start : start + self.seq_len + 1]
        return window[:-1], window[1:]
