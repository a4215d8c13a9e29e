"""From the data and tokenizer settings to the train and validation datasets."""

import math
from pathlib import Path
from typing import Tuple

from torch.utils.data import Dataset

from llmscale.config.load import REPO_ROOT, ConfigError
from llmscale.config.schema import LLMScaleConfig, ModelConfig, Objective
from llmscale.data import (
    PackedDataset,
    Tokenizer,
    build_tokenizer,
    load_token_stream,
    resolve_paths,
    split_train_val,
)


def resolve_vocab_size(model: ModelConfig, tokenizer_vocab_size: int, tp: int = 1) -> int:
    """The embedding rows: the tokenizer's vocabulary padded to a multiple of `vocab_multiple`
    and of `tp` (each tensor-parallel rank holds an equal share), unless the model fixes its
    own (which must hold every token id)."""
    if model.vocab_size is None:
        multiple = math.lcm(model.vocab_multiple, tp)
        return -(-tokenizer_vocab_size // multiple) * multiple
    if model.vocab_size < tokenizer_vocab_size:
        raise ConfigError(
            f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer_vocab_size} tokens: raise it or set model.vocab_size=null to derive it"
        )
    return model.vocab_size


def fill_in_vocab_size(cfg: LLMScaleConfig) -> None:
    """Set model.vocab_size from the tokenizer when the config leaves it to it, as a run would
    (for reports that build no datasets: the dry run, tools/plan.py)."""
    if cfg.model.vocab_size is None:
        masked_lm = cfg.objective is Objective.mlm
        vocab = build_tokenizer(cfg.tokenizer, REPO_ROOT, masked_lm).vocab_size
        cfg.model.vocab_size = resolve_vocab_size(cfg.model, vocab, cfg.parallel.tp)


def build_datasets(cfg: LLMScaleConfig, root: Path) -> Tuple[Dataset, Dataset, Tokenizer]:
    """Train and validation samples: preference pairs when `data.pairs` names a folder of them;
    from a prepared chat folder when `data.chat` names one;
    from a blend of prepared datasets when `data.blend` lists any (call this once
    torch.distributed is up: megatron-core's index builder needs it); else from the text files
    in `data.paths`."""
    tokenizer = build_tokenizer(cfg.tokenizer, root, cfg.objective is Objective.mlm)
    if cfg.data.pairs:
        # Imported here, as chat data is: both read megatron-core's indexed datasets.
        from llmscale.data.preference_pairs import build_pair_datasets

        train_set, val_set = build_pair_datasets(cfg.data.pairs, cfg.data.seq_len,
                                                 cfg.data.val_fraction, tokenizer, root)
        return train_set, val_set, tokenizer
    if cfg.data.chat:
        # Imported here, as blends are: megatron-core warns at import about GPU kernels.
        from llmscale.data.chat_samples import build_chat_datasets

        data = cfg.data
        train_set, val_set = build_chat_datasets(data.chat, data.seq_len, data.val_fraction,
                                                 data.pack, tokenizer, root)
        return train_set, val_set, tokenizer
    if cfg.data.blend:
        # Imported here: megatron-core, which blends use, warns at import about GPU kernels.
        from llmscale.data.blend import build_blended_datasets

        splits = build_blended_datasets(cfg.data, tokenizer, root)
        return splits.train, splits.validation, tokenizer
    tokens = load_token_stream(resolve_paths(cfg.data.paths, root), tokenizer)
    train_tokens, val_tokens = split_train_val(tokens, cfg.data.val_fraction)
    train_set = PackedDataset(train_tokens, cfg.data.seq_len, name="the training split")
    val_set = PackedDataset(val_tokens, cfg.data.seq_len, name="the validation split")
    return train_set, val_set, tokenizer
