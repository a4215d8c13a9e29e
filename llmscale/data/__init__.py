"""Tokenizers, packed token datasets, and the global sample order that feeds data-parallel ranks.

Blends of prepared datasets (llmscale.data.blend) load megatron-core, so they are imported from
their module. The offline pipeline that prepares those datasets is llmscale.prep.
"""

from llmscale.data.corpus import PackedDataset, load_token_stream, resolve_paths, split_train_val
from llmscale.data.documents import document_attention_mask, document_ids, document_position_ids
from llmscale.data.sampler import GlobalSampleOrder, SampleDataset, rank_micro_batches
from llmscale.data.tokenizer import (
    ByteTokenizer,
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    build_tokenizer,
    open_tokenizer,
    train_sentencepiece,
    train_sentencepiece_on_lines,
)

__all__ = [
    "ByteTokenizer",
    "GlobalSampleOrder",
    "HuggingFaceTokenizer",
    "PackedDataset",
    "SampleDataset",
    "SentencePieceTokenizer",
    "Tokenizer",
    "build_tokenizer",
    "document_attention_mask",
    "document_ids",
    "document_position_ids",
    "load_token_stream",
    "open_tokenizer",
    "rank_micro_batches",
    "resolve_paths",
    "split_train_val",
    "train_sentencepiece",
    "train_sentencepiece_on_lines",
]
