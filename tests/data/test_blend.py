"""Blends of indexed datasets: interop with megatron-core's files, weights, splits, resume."""

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from corpus_fixtures import REPO_ROOT
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from llmscale.config.load import load_config
from llmscale.config.schema import BlendSource, DataConfig
from llmscale.data import (
    ByteTokenizer,
    GlobalSampleOrder,
    SentencePieceTokenizer,
    rank_micro_batches,
)
from llmscale.data.blend import build_blended_datasets
from llmscale.prep.cli import build_config, build_parser
from llmscale.prep.preprocess import run_preprocess
from llmscale.prep.tokenize_stage import TokenizeTask, token_dtype, tokenize_part

TOKENIZER = ByteTokenizer()
EOD = TOKENIZER.eod_id
SEQ_LEN = 32


@pytest.fixture(scope="module", autouse=True)
def one_process_group():
    """megatron-core's dataset builder coordinates ranks through torch.distributed."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def write_megatron_dataset(prefix: Path, documents: list[bytes], dtype=np.int32) -> Path:
    """Shards as Megatron-LM's preprocess_data.py writes them (--append-eod, int32 ids)."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for document in documents:
        ids = list(document) + [EOD]
        builder.add_document(torch.tensor(ids), [len(ids)])
    builder.finalize(f"{prefix}.idx")
    return prefix


def numbered_documents(tag: str, count: int, length: int) -> list[bytes]:
    """Documents that say who they are: b"<tag>:<number>:" then filler letters."""
    rng = np.random.default_rng(len(tag) * 1000 + count)
    documents = []
    for number in range(count):
        head = f"{tag}:{number}:".encode()
        filler = bytes(rng.integers(97, 123, size=length).tolist())
        documents.append(head + filler)
    return documents


def blend_config(root: Path, sources: list[tuple[str, float]], **changes) -> DataConfig:
    settings = dict(
        paths=[],
        blend=[BlendSource(path=path, weight=weight) for path, weight in sources],
        seq_len=SEQ_LEN,
        val_fraction=0.1,
        test_fraction=0.05,
        seed=7,
        index_cache_dir=str(root / "index_cache"),
    )
    settings.update(changes)
    return DataConfig(**settings)


def pieces_between_eods(sample: torch.Tensor) -> list[bytes]:
    cut = [-1] + (sample == EOD).nonzero().flatten().tolist() + [len(sample)]
    return [bytes(sample[a + 1 : b].tolist()) for a, b in zip(cut, cut[1:])]


@pytest.fixture(scope="module")
def megatron_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[bytes]]]:
    root = tmp_path_factory.mktemp("megatron")
    documents = {
        "books": numbered_documents("books", 300, 40),
        "web": numbered_documents("web", 400, 25),
        "code": numbered_documents("code", 1300, 60),
    }
    for name, docs in documents.items():
        write_megatron_dataset(root / name / f"{name}_text_document", docs)
    return root, documents


def test_megatron_written_shards_train_as_packed_windows(megatron_files) -> None:
    root, documents = megatron_files
    data = blend_config(root, [("books/books_text_document", 1.0)])
    splits = build_blended_datasets(data, TOKENIZER, root)
    assert splits.validation is not None and splits.test is not None
    by_split = {}
    for name, dataset in [
        ("train", splits.train),
        ("validation", splits.validation),
        ("test", splits.test),
    ]:
        seen = set()
        for index in range(len(dataset)):
            inputs, labels = dataset[index]
            assert inputs.shape == labels.shape == (SEQ_LEN,)
            assert torch.equal(inputs[1:], labels[:-1])
            window = torch.cat([inputs, labels[-1:]])
            for piece in pieces_between_eods(window):
                # Every stretch between EODs is part of one document.
                assert any(piece in document for document in documents["books"]), piece
                header = re.match(rb"books:(\d+):", piece)
                if header:
                    seen.add(int(header.group(1)))
        by_split[name] = seen
    # Documents are split by position: 85% / 10% / 5%, and no document is in two splits.
    assert max(by_split["train"]) < 255 <= min(by_split["validation"])
    assert max(by_split["validation"]) < 285 <= min(by_split["test"])


def test_llmscale_shards_open_with_megatron_reader(tmp_path: Path) -> None:
    part = tmp_path / "part-00000.jsonl"
    texts = ["first document", "第二个文件", "third\nwith a newline"]
    part.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    result = tokenize_part(TokenizeTask(part, tmp_path / "tokens" / "part-00000", "byte"))
    assert (result.documents, result.written) == (3, True)
    shard = IndexedDataset(str(tmp_path / "tokens" / "part-00000"))
    assert len(shard) == 3 and list(shard.document_indices) == [0, 1, 2, 3]
    for index, text in enumerate(texts):
        ids = shard[index]
        assert ids.dtype == np.uint16
        assert ids.tolist() == list(text.encode()) + [EOD]
    assert result.tokens == sum(len(t.encode()) + 1 for t in texts)


def test_token_dtype_follows_vocabulary_size() -> None:
    assert token_dtype(257) is np.uint16
    assert token_dtype(32_000) is np.uint16
    assert token_dtype(128_256) is np.int32


def test_sampled_proportions_match_the_weights(megatron_files) -> None:
    root, _ = megatron_files
    weights = {"books": 0.5, "web": 0.3, "code": 0.2}
    sources = [(f"{name}/{name}_text_document", w) for name, w in weights.items()]
    train = build_blended_datasets(blend_config(root, sources), TOKENIZER, root).train
    assert len(train) >= 10_000
    drawn = np.bincount([train.source(i) for i in range(10_000)], minlength=3) / 10_000
    assert np.all(np.abs(drawn - list(weights.values())) < 0.01), drawn
    # The samples themselves come from the dataset `source` names.
    for index in range(0, 2000, 97):
        name = list(weights)[train.source(index)]
        window = torch.cat(train[index])
        assert all(
            not p.startswith(b"web:" if name != "web" else b"code:")
            for p in pieces_between_eods(window)
        )


def global_order(
    data: DataConfig, root: Path, layouts: list[tuple[int, int]], micro_batch: int = 2
) -> dict[int, torch.Tensor]:
    """Sample by global index, consumed as the trainer does: `layouts` is a list of
    (data-parallel size, steps) phases, each a fresh process that rebuilds the datasets."""
    global_batch = 8
    consumed, samples = 0, {}
    for dp_size, steps in layouts:
        train = build_blended_datasets(data, TOKENIZER, root).train
        order = GlobalSampleOrder(len(train), data.seed)
        accumulation = global_batch // (micro_batch * dp_size)
        for _ in range(steps):
            for rank in range(dp_size):
                batches = rank_micro_batches(
                    train, order, consumed, micro_batch, accumulation, rank, dp_size
                )
                for step, (inputs, _) in enumerate(batches):
                    first = consumed + step * micro_batch * dp_size + rank * micro_batch
                    for j in range(micro_batch):
                        assert first + j not in samples, "a sample was given out twice"
                        samples[first + j] = inputs[j]
            consumed += global_batch
    assert sorted(samples) == list(range(consumed)), "a sample was skipped"
    return samples


@pytest.mark.parametrize("resumed_dp", [1, 4])
def test_resume_on_another_data_parallel_size_continues_the_global_order(
    megatron_files, resumed_dp: int
) -> None:
    root, _ = megatron_files
    data = blend_config(root, [("books/books_text_document", 0.6), ("web/web_text_document", 0.4)])
    uninterrupted = global_order(data, root, [(2, 10)])
    resumed = global_order(data, root, [(2, 4), (resumed_dp, 6)])
    assert all(torch.equal(uninterrupted[g], resumed[g]) for g in uninterrupted)
    # A different seed is a different order.
    other = global_order(blend_config(root, data_sources(data), seed=8), root, [(2, 1)])
    assert not all(torch.equal(uninterrupted[g], other[g]) for g in other)


def data_sources(data: DataConfig) -> list[tuple[str, float]]:
    return [(source.path, source.weight) for source in data.blend]


def test_prepared_dataset_folders_blend_and_check_their_tokenizer(
    megatron_files, tmp_path: Path
) -> None:
    root, documents = megatron_files
    folder = tmp_path / "prepared" / "tokens" / "books"
    for number in range(2):
        write_megatron_dataset(
            folder / f"part-{number:05d}", documents["books"][number::2], np.uint16
        )
    metadata = {
        "tokenizer": {
            "kind": "ByteTokenizer",
            "vocab_sha256": None,
            "vocab_size": 257,
            "eod_id": EOD,
        }
    }
    (folder / "dataset.json").write_text(json.dumps(metadata))
    train = build_blended_datasets(
        blend_config(tmp_path, [(str(folder), 1.0)]), TOKENIZER, tmp_path
    ).train
    assert {train.source(i) for i in range(len(train))} == {0}
    metadata["tokenizer"]["vocab_size"] = 32_000
    (folder / "dataset.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=r"data.blend\[0\].*was tokenized with.*set tokenizer"):
        build_blended_datasets(blend_config(tmp_path, [(str(folder), 1.0)]), TOKENIZER, tmp_path)


def test_bad_blends_are_explained(megatron_files, tmp_path: Path) -> None:
    root, _ = megatron_files
    with pytest.raises(
        FileNotFoundError, match=r"data.blend\[1\].path='nowhere'.*tools/preprocess_data.py"
    ):
        build_blended_datasets(
            blend_config(root, [("web/web_text_document", 1), ("nowhere", 1)]), TOKENIZER, root
        )
    with pytest.raises(ValueError, match=r"data.blend\[0\].weight must be > 0"):
        build_blended_datasets(blend_config(root, [("web/web_text_document", 0)]), TOKENIZER, root)
    with pytest.raises(ValueError, match="less than one sample of data.seq_len=4096"):
        build_blended_datasets(
            blend_config(root, [("web/web_text_document", 1)], seq_len=4096), TOKENIZER, root
        )
    with pytest.raises(ValueError, match="data.val_fraction=0.6 and data.test_fraction=0.5"):
        build_blended_datasets(
            blend_config(root, [("web/web_text_document", 1)], val_fraction=0.6, test_fraction=0.5),
            TOKENIZER,
            root,
        )
    with pytest.raises(ValueError, match="data.blend is empty"):
        build_blended_datasets(blend_config(root, []), TOKENIZER, root)


def test_the_example_blend_config_prepares_and_builds_as_its_comment_says(tmp_path: Path) -> None:
    config_file = REPO_ROOT / "conf" / "data" / "blend_example.yaml"
    lines = config_file.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if "python tools/preprocess_data.py" in line)
    command = []
    for line in lines[first:]:
        command.append(line.lstrip("# ").rstrip("\\ "))
        if not line.rstrip().endswith("\\"):
            break
    args = build_parser().parse_args(shlex.split(" ".join(command))[2:])
    args.output = tmp_path / "prepared" / "example"
    run_preprocess(build_config(args), REPO_ROOT, log=lambda line: None)

    data = load_config(["data=blend_example"]).data
    data.blend = [BlendSource(str(tmp_path / s.path), s.weight) for s in data.blend]
    data.index_cache_dir = str(tmp_path / "index_cache")
    tokenizer = SentencePieceTokenizer(args.output / "tokenizer.model")
    splits = build_blended_datasets(data, tokenizer, REPO_ROOT)
    assert splits.validation is not None and splits.test is not None
    assert len(splits.validation) >= 64 and len(splits.test) >= 8
    drawn = np.bincount([splits.train.source(i) for i in range(2000)]) / 2000
    assert np.allclose(drawn, [0.7, 0.3], atol=0.01)
    inputs, _ = splits.train[0]
    assert inputs.shape == (128,) and int(inputs.max()) < tokenizer.vocab_size
