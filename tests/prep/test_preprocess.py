"""The whole pipeline on a small English + Chinese corpus in several formats."""

import json
from pathlib import Path

import numpy as np
import pyarrow
import pyarrow.parquet
import pytest
from corpus_fixtures import CHINESE, SHAKESPEARE, english_paragraphs, train_hf_tokenizer
from megatron.core.datasets.indexed_dataset import IndexedDataset

from llmscale.data.tokenizer import HuggingFaceTokenizer, SentencePieceTokenizer
from llmscale.prep import tokenize_stage
from llmscale.prep.cleaning import CleaningConfig, clean_text
from llmscale.prep.dedup import DedupIndex
from llmscale.prep.prepare import PrepareConfig
from llmscale.prep.preprocess import PreprocessConfig, TokenizerTrainingConfig, run_preprocess
from llmscale.prep.quality import QualityConfig

ENGLISH = english_paragraphs(count=60)
TRAINING = TokenizerTrainingConfig(vocab_size=600)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """en: text files (one coloured) and JSON lines with bad lines and duplicates; zh: parquet."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "en" / "plays").mkdir(parents=True)
    for i, text in enumerate(ENGLISH[:10]):
        (root / "en" / "plays" / f"{i:02d}.txt").write_text(text + "\n")
    # A terminal capture: coloured, the colours are removed and counted.
    (root / "en" / "plays" / "00.txt").write_text(f"\x1b[33m{ENGLISH[0]}\x1b[m\n")
    (root / "en" / "plays" / "empty.txt").write_text("")
    (root / "en" / "plays" / "blob.txt").write_bytes(b"\x00\x01binary\x00" * 100)
    # Same words, other punctuation: a near duplicate, not an exact one.
    near = ENGLISH[12].replace(",", ";")
    records = [json.dumps({"text": t}) for t in ENGLISH[10:]]
    records += [
        "not json at all",
        json.dumps({"body": "no text field"}),
        json.dumps({"text": ENGLISH[11]}),
        json.dumps({"text": near}),
    ]
    (root / "en" / "more.jsonl").write_text("\n".join(records) + "\n")
    zh = CHINESE + [CHINESE[0], "太短了。"]
    pyarrow.parquet.write_table(pyarrow.table({"text": zh}), root / "zh.parquet")
    return root


def preprocess(corpus: Path, output: Path, **changes) -> dict:
    settings = dict(
        datasets={"en": ("en",), "zh": ("zh.parquet",)},
        output=output,
        train_tokenizer=TRAINING,
        part_bytes=8_000,
    )
    settings.update(changes)
    return run_preprocess(PreprocessConfig(**settings), corpus, log=lambda line: None)


def cleaned_texts(output: Path, dataset: str) -> list[str]:
    parts = sorted((output / "cleaned" / dataset).glob("part-*.jsonl"))
    return [json.loads(line)["text"] for part in parts for line in part.read_text().splitlines()]


def token_documents(output: Path, dataset: str) -> list[np.ndarray]:
    documents = []
    for index in sorted((output / "tokens" / dataset).glob("part-*.idx")):
        shard = IndexedDataset(str(index.with_suffix("")))
        documents += [shard[i].copy() for i in range(len(shard))]
    return documents


def counts(report: dict) -> dict:
    """The per-dataset figures of a report, without the output path they were written to."""
    return {
        name: {k: v for k, v in stats.items() if k != "path"}
        for name, stats in report["datasets"].items()
    }


def output_files(output: Path) -> dict[str, bytes]:
    """Every result file of a run, to compare runs in different folders: not the SQLite state
    (its page layout may differ), the report (timings) or the tokenizer model file (it records
    the path it was trained to; its pieces are compared through the recorded vocab digest)."""
    return {
        str(path.relative_to(output)): path.read_bytes()
        for path in sorted(output.rglob("*"))
        if path.is_file()
        and path.suffix not in (".sqlite", ".sqlite-wal", ".sqlite-shm")
        and path.name not in ("report.json", "tokenizer.model")
    }


@pytest.fixture(scope="module")
def finished(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("finished")
    return output, preprocess(corpus, output)


def test_report_counts_every_stage(finished: tuple[Path, dict]) -> None:
    _, report = finished
    en, zh = report["datasets"]["en"], report["datasets"]["zh"]
    # 12 text files (one empty, one binary) and 54 JSON lines.
    assert en["documents_in"] == 12 + 54
    assert en["dropped"] == {
        "empty": 1,
        "binary": 1,
        "bad_json": 1,
        "missing_field": 1,
        "exact_duplicate": 1,
        "near_duplicate": 1,
    }
    assert en["documents_kept"] == 60
    assert en["terminal_escapes_removed"] == 2
    assert zh["documents_in"] == 7
    assert zh["dropped"] == {"exact_duplicate": 1, "too_short": 1}
    assert zh["documents_kept"] == 5
    assert report["near_duplicate_clusters"] == 1
    assert report["total"]["documents_kept"] == 65
    assert en["tokens"] > 0 and zh["tokens"] > 0
    assert en["tokens"] + zh["tokens"] == report["stages"]["tokenize"]["tokens_written"]
    assert report["stages"]["tokenize"]["tokens_per_second"] > 0
    assert json.loads((finished[0] / "report.json").read_text())["datasets"] == report["datasets"]


def test_cleaned_text_round_trips_through_the_shards(finished: tuple[Path, dict]) -> None:
    output, report = finished
    tokenizer = SentencePieceTokenizer(output / "tokenizer.model")
    for dataset in ("en", "zh"):
        texts = cleaned_texts(output, dataset)
        documents = token_documents(output, dataset)
        assert len(documents) == len(texts) == report["datasets"][dataset]["documents_kept"]
        for text, ids in zip(texts, documents):
            assert ids.dtype == np.uint16
            assert ids[-1] == tokenizer.eod_id and tokenizer.eod_id not in ids[:-1]
            assert tokenizer.decode(ids[:-1].tolist()) == text
    # The cleaned text is the input, cleaned, in input order.
    # Sources are read in sorted order: en/more.jsonl, then en/plays/*.txt.
    expected = [clean_text(t, CleaningConfig()).text for t in ENGLISH[10:] + ENGLISH[:10]]
    assert cleaned_texts(output, "en") == expected
    assert cleaned_texts(output, "zh") == CHINESE


def test_shards_record_their_tokenizer(finished: tuple[Path, dict]) -> None:
    output, report = finished
    metadata = json.loads((output / "tokens" / "en" / "dataset.json").read_text())
    assert metadata["tokenizer"]["vocab_sha256"] == report["tokenizer"]["vocab_sha256"]
    assert metadata["tokenizer"]["vocab_size"] == 600
    assert metadata["dtype"] == "uint16"
    assert metadata["tokens"] == report["datasets"]["en"]["tokens"]
    assert len(metadata["shards"]) == report["datasets"]["en"]["token_shards"] > 1


def test_a_finished_run_rerun_does_nothing(corpus: Path, finished: tuple[Path, dict]) -> None:
    output, report = finished
    before = output_files(output)
    again = preprocess(corpus, output)
    assert again["stages"]["tokenize"]["shards_written"] == 0
    assert again["datasets"] == report["datasets"]
    assert output_files(output) == before


def test_a_run_killed_in_each_stage_resumes_to_the_same_bytes(
    corpus: Path, finished: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "killed"
    real_save, saves = DedupIndex.save, []

    def die_at_third_checkpoint(self: DedupIndex, state: dict) -> None:
        saves.append(state["position"])
        if len(saves) == 3:
            raise KeyboardInterrupt
        real_save(self, state)

    monkeypatch.setattr(DedupIndex, "save", die_at_third_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        preprocess(corpus, output)
    assert 0 < saves[-1] < 73
    monkeypatch.setattr(DedupIndex, "save", real_save)

    real_part, parts = tokenize_stage.tokenize_part, []

    def die_in_second_part(task: tokenize_stage.TokenizeTask) -> tokenize_stage.TokenizedPart:
        parts.append(task)
        if len(parts) == 2:
            # A half-written shard, as a killed worker leaves it.
            task.prefix.with_name(task.prefix.name + ".tmp.bin").write_bytes(b"partial")
            raise KeyboardInterrupt
        return real_part(task)

    monkeypatch.setattr(tokenize_stage, "tokenize_part", die_in_second_part)
    with pytest.raises(KeyboardInterrupt):
        preprocess(corpus, output)
    monkeypatch.setattr(tokenize_stage, "tokenize_part", real_part)

    report = preprocess(corpus, output)
    assert (
        report["stages"]["tokenize"]["shards_written"]
        == report["datasets"]["en"]["token_shards"] + report["datasets"]["zh"]["token_shards"] - 1
    )
    assert counts(report) == counts(finished[1])
    assert output_files(output) == output_files(finished[0])


def test_worker_processes_write_the_same_bytes(
    corpus: Path, finished: tuple[Path, dict], tmp_path: Path
) -> None:
    report = preprocess(corpus, tmp_path / "parallel", workers=2)
    assert counts(report) == counts(finished[1])
    assert output_files(tmp_path / "parallel") == output_files(finished[0])


def test_other_settings_on_an_existing_output_are_refused(
    corpus: Path, finished: tuple[Path, dict]
) -> None:
    strict = PrepareConfig(quality=QualityConfig(min_chars=500))
    with pytest.raises(ValueError, match=r"other settings \(prepare differ\).*new --output"):
        preprocess(corpus, finished[0], prepare=strict)


def test_an_existing_tokenizer_is_used_as_given(
    corpus: Path, finished: tuple[Path, dict], tmp_path: Path
) -> None:
    model = finished[0] / "tokenizer.model"
    report = preprocess(corpus, tmp_path / "given", train_tokenizer=None, tokenizer=str(model))
    assert not (tmp_path / "given" / "tokenizer.model").exists()
    assert report["tokenizer"]["vocab_sha256"] == finished[1]["tokenizer"]["vocab_sha256"]
    assert (
        output_files(tmp_path / "given")["tokens/zh/part-00000.bin"]
        == output_files(finished[0])["tokens/zh/part-00000.bin"]
    )


def test_a_hugging_face_tokenizer_json_round_trips_too(corpus: Path, tmp_path: Path) -> None:
    path = train_hf_tokenizer(tmp_path / "tokenizer.json", SHAKESPEARE / "hamlet.txt")
    output = tmp_path / "hf"
    preprocess(corpus, output, train_tokenizer=None, tokenizer=str(path))
    tokenizer = HuggingFaceTokenizer(path)
    for dataset in ("en", "zh"):
        documents = token_documents(output, dataset)
        assert [tokenizer.decode(ids.tolist()) for ids in documents] == cleaned_texts(
            output, dataset
        )
        assert all(ids[-1] == tokenizer.eod_id for ids in documents)
