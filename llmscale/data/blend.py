"""Training samples from prepared datasets: a weighted blend of Megatron indexed datasets,
split into train / validation / test by documents, packed into `seq_len` windows and
shuffled by seed. megatron-core's GPTDataset and BlendedDataset do the packing, splitting,
shuffling and blending; this module sizes the blend and checks the inputs.

The blend's length depends only on the data, the weights, the split and `seq_len`, never on
how long a run trains: sample g is the same sample whatever `train.max_steps` says, so a run
extended and resumed continues the very order it started (a Megatron-LM blend sized by the
run's sample count reorders when the count changes). One pass over the blend sees every
sample of every dataset at least once; the train sampler wraps around after it.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from torch import Tensor

from llmscale.config.schema import DataConfig
from llmscale.data.tokenizer import Tokenizer, tokenizer_identity

# Written beside a dataset's shards by the preprocessing pipeline (llmscale.prep.preprocess): its
# tokenizer's identity and its counts.
DATASET_METADATA = "dataset.json"
SPLIT_NAMES = ("train", "validation", "test")


class BlendedSamples:
    """(input_ids, labels) samples of one split of a blend, each `seq_len` tokens, labels one
    position ahead; index order is the shuffled blend order."""

    def __init__(self, dataset: BlendedDataset, entry_of_shard: list[int], name: str) -> None:
        self.dataset = dataset
        self.entry_of_shard = entry_of_shard
        self.name = name

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} is out of range for {len(self)} {self.name} samples.")
        sample = self.dataset[index]
        return sample["tokens"], sample["labels"]

    def source(self, index: int) -> int:
        """Which `data.blend` entry sample `index` comes from."""
        return self.entry_of_shard[int(self.dataset.dataset_index[index])]


@dataclass(frozen=True)
class BlendSplits:
    train: BlendedSamples
    # None when the split's fraction is 0.
    validation: BlendedSamples | None
    test: BlendedSamples | None


@dataclass(frozen=True)
class _Shard:
    prefix: str
    entry: int
    tokens_per_split: tuple[int, ...]


def build_blended_datasets(data: DataConfig, tokenizer: Tokenizer, root: Path) -> BlendSplits:
    """The train / validation / test samples of `data.blend`, read as ids of `tokenizer`.

    Relative paths resolve against `root`. Datasets prepared by tools/preprocess_data.py are
    checked to have been tokenized by `tokenizer`. Every rank calls this once torch.distributed
    is up: megatron-core's builder has rank 0 write the index files into
    `data.index_cache_dir` (which all nodes must share) while the others wait, then read them.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError(
            "build_blended_datasets needs torch.distributed initialized, as megatron-core's "
            "index builder orders ranks through it; a single process can use "
            "torch.distributed.init_process_group('gloo', store=torch.distributed.HashStore(), "
            "rank=0, world_size=1)."
        )
    if not data.blend:
        raise ValueError(
            "data.blend is empty; list prepared datasets in it (see conf/data/blend_example.yaml)."
        )
    # Fixed-point digits: megatron-core reads the split string's numbers without exponents.
    split = ",".join(f"{fraction:.6f}" for fraction in _split_fractions(data))
    split_matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    shards = _shards(data, tokenizer, root, split_matrix)
    weights = _shard_weights(data, shards)
    sizes = _blend_sizes(shards, weights, split_matrix, data.seq_len)
    cache = _resolve(data.index_cache_dir, root)
    config = GPTDatasetConfig(
        random_seed=data.seed,
        sequence_length=data.seq_len,
        blend=([shard.prefix for shard in shards], weights),
        split=split,
        tokenizer=_MegatronTokenizerInfo(tokenizer),
        path_to_cache=str(cache),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        # Document masks come from the token ids (llmscale.data.documents) when a model wants
        # them, not as a [seq, seq] tensor per sample.
        create_attention_mask=False,
    )
    built = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    entries = [shard.entry for shard in shards]
    splits = [
        BlendedSamples(dataset, entries, name) if dataset is not None else None
        for name, dataset in zip(SPLIT_NAMES, built)
    ]
    assert splits[0] is not None
    return BlendSplits(splits[0], splits[1], splits[2])


def _blend_sizes(
    shards: list[_Shard], weights: list[float], split_matrix: list, seq_len: int
) -> list[int]:
    """Samples per split: enough that every shard is drawn through at least once at its
    weight (0 for a split of fraction 0)."""
    sizes = []
    for split_index, (name, bounds) in enumerate(zip(SPLIT_NAMES, split_matrix)):
        if bounds is None:
            sizes.append(0)
            continue
        samples = [(shard.tokens_per_split[split_index] - 1) // seq_len for shard in shards]
        for shard, count in zip(shards, samples):
            if count < 1:
                raise ValueError(
                    f"{shard.prefix} (data.blend[{shard.entry}]) has "
                    f"{shard.tokens_per_split[split_index]} tokens in its {name} split, less than "
                    f"one sample of data.seq_len={seq_len}; raise that split's fraction, lower "
                    f"data.seq_len, or prepare the dataset in fewer, larger shards "
                    f"(--shard-size-mb)."
                )
        sizes.append(max(math.ceil(count / weight) for count, weight in zip(samples, weights)))
    return sizes


def shard_prefixes(path: Path) -> list[Path]:
    """A folder of shards stands for every `<prefix>.idx` in it; anything else is a prefix."""
    if path.is_dir():
        return sorted(index.with_suffix("") for index in path.glob("*.idx"))
    return [path]


def _split_fractions(data: DataConfig) -> tuple[float, float, float]:
    held_out = data.val_fraction + data.test_fraction
    if data.val_fraction < 0 or data.test_fraction < 0 or held_out >= 1:
        raise ValueError(
            f"data.val_fraction={data.val_fraction} and data.test_fraction={data.test_fraction} "
            f"must be >= 0 and leave documents for training (sum below 1)."
        )
    return (1.0 - held_out, data.val_fraction, data.test_fraction)


def _shards(data: DataConfig, tokenizer: Tokenizer, root: Path, split_matrix: list) -> list[_Shard]:
    shards = []
    for entry, source in enumerate(data.blend):
        if not source.weight > 0:
            raise ValueError(f"data.blend[{entry}].weight must be > 0, got {source.weight}.")
        path = _resolve(source.path, root)
        prefixes = shard_prefixes(path)
        missing = [p for p in prefixes if not (_exists(p, ".bin") and _exists(p, ".idx"))]
        if not prefixes or missing:
            raise FileNotFoundError(
                f"data.blend[{entry}].path={source.path!r} names no prepared dataset (looked for "
                f"{path}/*.idx or {path}.bin + {path}.idx); prepare one with "
                f"tools/preprocess_data.py or fix the path."
            )
        check_tokenizer(path, f"data.blend[{entry}]", tokenizer)
        for prefix in prefixes:
            # Held in a name: its lengths are a view of a memory map the dataset closes on exit.
            indexed = IndexedDataset(str(prefix))
            tokens = _split_tokens(indexed.sequence_lengths, split_matrix)
            shards.append(_Shard(str(prefix), entry, tokens))
    return shards


def _split_tokens(lengths: np.ndarray, split_matrix: list) -> tuple[int, ...]:
    """Tokens in each split's documents, cut where megatron-core's builder cuts them."""
    count = len(lengths)
    tokens = []
    for bounds in split_matrix:
        if bounds is None:
            tokens.append(0)
            continue
        begin, end = (int(round(bound * float(count))) for bound in bounds)
        tokens.append(int(lengths[begin:end].sum(dtype=np.int64)))
    return tuple(tokens)


def _shard_weights(data: DataConfig, shards: list[_Shard]) -> list[float]:
    """Each entry's weight, shared among its shards by their tokens, normalised to sum 1."""
    entry_tokens: dict[int, int] = {}
    for shard in shards:
        entry_tokens[shard.entry] = entry_tokens.get(shard.entry, 0) + sum(shard.tokens_per_split)
    weights = [
        data.blend[shard.entry].weight * sum(shard.tokens_per_split) / entry_tokens[shard.entry]
        for shard in shards
    ]
    return [weight / sum(weights) for weight in weights]


def check_tokenizer(path: Path, field: str, tokenizer: Tokenizer) -> None:
    """Datasets prepared by llmscale's tools record their tokenizer; refuse another one's.
    `field` names the setting that points at `path`, for the message."""
    metadata = path / DATASET_METADATA
    if not metadata.is_file():
        return
    recorded = json.loads(metadata.read_text())["tokenizer"]
    current = tokenizer_identity(tokenizer)
    if any(recorded.get(key) != current[key] for key in ("vocab_size", "eod_id", "vocab_sha256")):
        raise ValueError(
            f"{field} ({path}) was tokenized with {recorded}, but training uses "
            f"{current}; set tokenizer.* to the tokenizer it was prepared with."
        )


class _MegatronTokenizerInfo:
    """The tokenizer facts megatron-core's GPTDataset reads (and hashes into cache names)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.vocab_size = tokenizer.vocab_size
        self.eod = tokenizer.eod_id
        self.unique_identifiers = {"vocab_size": self.vocab_size, "eod": self.eod}


def _resolve(path: str, root: Path) -> Path:
    expanded = Path(path).expanduser()
    return expanded if expanded.is_absolute() else root / expanded


def _exists(prefix: Path, suffix: str) -> bool:
    return prefix.with_name(prefix.name + suffix).is_file()
