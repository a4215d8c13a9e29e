"""Tokenizers, packed token datasets, and the global sample order that feeds data-parallel ranks."""

from llmscale.data.corpus import PackedDataset, load_token_stream, resolve_paths, split_train_val
from llmscale.data.sampler import GlobalSampleOrder, SampleDataset, rank_micro_batches
from llmscale.data.tokenizer import (
    ByteTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    build_tokenizer,
    train_sentencepiece,
)

__all__ = [
    "ByteTokenizer",
    "GlobalSampleOrder",
    "PackedDataset",
    "SampleDataset",
    "SentencePieceTokenizer",
    "Tokenizer",
    "build_tokenizer",
    "load_token_stream",
    "rank_micro_batches",
    "resolve_paths",
    "split_train_val",
    "train_sentencepiece",
]
