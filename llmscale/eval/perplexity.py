"""Perplexity on held-out text: text files, or a dataset prepared by tools/preprocess_data.py
(its folder of shards), cut into consecutive windows of `seq_len` next-token predictions as in
training. Each window's loss sum is computed in a batch fixed by the data alone and the sums are
added in window order, so every rank count gives the same figure to the last bit."""

import json
import math
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from llmscale.data import PackedDataset, Tokenizer, load_token_stream, resolve_paths
from llmscale.data.tokenizer import tokenizer_identity
from llmscale.eval.model_source import LoadedModel
from llmscale.eval.ranks import Ranks
from llmscale.models.llama import token_cross_entropy


def token_stream(sources: List[str], tokenizer: Tokenizer, root: Path,
                 setting: str) -> torch.Tensor:
    """The token ids of every source in order: a prepared dataset's documents as stored, a
    text file (or the files under a folder, or a glob) encoded as one document each. Relative
    paths start at `root`; `setting` names the sources in errors."""
    streams = []
    for source in sources:
        path = Path(source).expanduser()
        path = path if path.is_absolute() else root / path
        if path.is_dir() and any(path.glob("*.idx")):
            streams.append(_prepared_tokens(path, tokenizer))
        else:
            streams.append(load_token_stream(resolve_paths([source], root, setting),
                                             tokenizer))
    return torch.cat(streams)


def _prepared_tokens(folder: Path, tokenizer: Tokenizer) -> torch.Tensor:
    # Imported here: megatron-core warns at import about GPU kernels.
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from llmscale.data.blend import DATASET_METADATA, shard_prefixes

    metadata = folder / DATASET_METADATA
    if metadata.is_file():
        recorded = json.loads(metadata.read_text())["tokenizer"]
        current = tokenizer_identity(tokenizer)
        if any(recorded.get(key) != current[key] for key in ("vocab_size", "eod_id",
                                                            "vocab_sha256")):
            raise ValueError(f"{folder} was tokenized with {recorded}, but the model's tokenizer "
                             f"is {current}: evaluate it with the tokenizer it was prepared "
                             "with (--tokenizer), or prepare the text again")
    documents = []
    for prefix in shard_prefixes(folder):
        shard = IndexedDataset(str(prefix))
        documents += [np.asarray(shard[i], dtype=np.int64) for i in range(len(shard))]
    return torch.from_numpy(np.concatenate(documents))


@torch.no_grad()
def evaluate_perplexity(loaded: LoadedModel, tokens: torch.Tensor, ranks: Ranks,
                        seq_len: int = 0, batch_size: int = 4, max_windows: int = 0) -> Dict:
    """Mean next-token loss and its exponential over `max_windows` windows (0: all) of
    `seq_len` tokens (0: the model's max_seq_len)."""
    model = loaded.model
    seq_len = seq_len or model.cfg.max_seq_len
    if seq_len > model.cfg.max_seq_len:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's window of "
                         f"{model.cfg.max_seq_len} (model.max_seq_len)")
    windows = PackedDataset(tokens, seq_len, name="the evaluation text")
    count = min(len(windows), max_windows) if max_windows else len(windows)
    batches = [range(start, min(start + batch_size, count))
               for start in range(0, count, batch_size)]
    device = next(model.parameters()).device
    mine = {}
    for index, batch in ranks.share(batches).items():
        inputs, labels = (torch.stack(part).to(device) for part in zip(*map(windows.__getitem__,
                                                                             batch)))
        losses = token_cross_entropy(model(inputs), labels)  # [B, S]
        mine[index] = losses.double().sum(dim=1).tolist()
    loss_sum = sum(window for batch in ranks.gather(mine) for window in batch)
    predicted = count * seq_len
    loss = loss_sum / predicted
    return {"metrics": {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                        "tokens": predicted, "windows": count, "seq_len": seq_len}}
