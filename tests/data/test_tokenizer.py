import random
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from corpus_fixtures import train_hf_tokenizer

from llmscale.config.schema import TokenizerConfig, TokenizerKind
from llmscale.data import (
    ByteTokenizer,
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    build_tokenizer,
    open_tokenizer,
    train_sentencepiece,
    train_sentencepiece_on_lines,
)
from llmscale.data.tokenizer import tokenizer_identity

REPO_ROOT = Path(__file__).resolve().parents[2]
HAMLET = REPO_ROOT / "data" / "shakespeare" / "hamlet.txt"
# Whitespace runs, newlines, tabs and characters absent from the training play must survive.
ROUND_TRIP_TEXTS = [
    "To be, or not to be: that is the question.",
    "Line one\n\n  indented\tline two  \n",
    "床前明月光，疑是地上霜。",
    "naïve café 🎉",
    "",
]


@pytest.fixture(scope="module")
def hamlet_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    prefix = tmp_path_factory.mktemp("tokenizer") / "hamlet"
    return train_sentencepiece([HAMLET], prefix, vocab_size=400)


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_byte_tokenizer_round_trips(text: str) -> None:
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert len(ids) == len(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text


def test_byte_tokenizer_decode_skips_eod_and_replaces_broken_bytes() -> None:
    tokenizer = ByteTokenizer()
    assert (tokenizer.vocab_size, tokenizer.eod_id) == (257, 256)
    assert tokenizer.decode([104, 105, tokenizer.eod_id]) == "hi"
    truncated = tokenizer.encode("你")[:2]
    assert tokenizer.decode(truncated + [33]) == "\ufffd!"


def test_sentencepiece_trains_and_round_trips(hamlet_model: Path) -> None:
    assert hamlet_model == hamlet_model.parent / "hamlet.model"
    config = TokenizerConfig(kind=TokenizerKind.sentencepiece, path=hamlet_model.name)
    tokenizer = build_tokenizer(config, root=hamlet_model.parent)
    assert isinstance(tokenizer, SentencePieceTokenizer)
    assert tokenizer.vocab_size == 400
    for text in ROUND_TRIP_TEXTS:
        ids = tokenizer.encode(text)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == text
    # Even ~70 learned merges make frequent English clearly shorter than its bytes.
    english = ROUND_TRIP_TEXTS[0]
    assert len(tokenizer.encode(english)) < 0.75 * len(english)


def test_sentencepiece_eod_is_the_models_eos(hamlet_model: Path) -> None:
    tokenizer = SentencePieceTokenizer(hamlet_model)
    assert tokenizer.eod_id == tokenizer._processor.eos_id() == 2
    assert tokenizer.eod_id not in tokenizer.encode("Hamlet </s> Ophelia")
    assert tokenizer.decode(tokenizer.encode("Hamlet") + [tokenizer.eod_id]) == "Hamlet"


def test_sentencepiece_training_is_deterministic(tmp_path: Path, hamlet_model: Path) -> None:
    again_path = train_sentencepiece([HAMLET], tmp_path / "again", vocab_size=400)
    again = SentencePieceTokenizer(again_path)
    first = SentencePieceTokenizer(hamlet_model)
    pieces = [first._processor.id_to_piece(i) for i in range(first.vocab_size)]
    assert pieces == [again._processor.id_to_piece(i) for i in range(again.vocab_size)]


def test_newlines_round_trip_without_byte_fallback(tmp_path: Path) -> None:
    # Training reads lines without their "\n", so nothing but its own piece keeps it encodable.
    model = train_sentencepiece(
        [HAMLET], tmp_path / "no_bytes", vocab_size=200, byte_fallback=False
    )
    tokenizer = SentencePieceTokenizer(model)
    text = "Enter HAMLET.\n\nHAMLET. To be, or not to be\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_sentencepiece_too_small_vocab_is_explained(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab"):
        train_sentencepiece([HAMLET], tmp_path / "tiny", vocab_size=100)


def test_sentencepiece_empty_corpus_is_explained(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="contain no text"):
        train_sentencepiece([empty], tmp_path / "model", vocab_size=400)


def test_missing_model_names_path_and_training_tool(tmp_path: Path) -> None:
    config = TokenizerConfig(kind=TokenizerKind.sentencepiece, path="tokenizers/absent.model")
    with pytest.raises(FileNotFoundError) as error:
        build_tokenizer(config, root=tmp_path)
    assert str(tmp_path / "tokenizers" / "absent.model") in str(error.value)
    assert "tools/train_tokenizer.py" in str(error.value)


def test_invalid_model_file_names_path(tmp_path: Path) -> None:
    not_a_model = tmp_path / "notes.model"
    not_a_model.write_text("plain text")
    with pytest.raises(ValueError, match="not a valid SentencePiece model") as error:
        SentencePieceTokenizer(not_a_model)
    assert str(not_a_model) in str(error.value)


def test_sentencepiece_without_path_asks_for_it() -> None:
    config = TokenizerConfig(kind=TokenizerKind.sentencepiece, path=None)
    with pytest.raises(ValueError, match="tokenizer.path"):
        build_tokenizer(config, root=REPO_ROOT)


def test_byte_kind_builds_byte_tokenizer() -> None:
    assert isinstance(build_tokenizer(TokenizerConfig(), root=REPO_ROOT), ByteTokenizer)


def test_cli_trains_from_repo_root(tmp_path: Path) -> None:
    output = tmp_path / "cli" / "tempest"
    result = subprocess.run(
        [
            sys.executable,
            "tools/train_tokenizer.py",
            "--input",
            "data/shakespeare/t*.txt",
            "--vocab-size",
            "400",
            "--output",
            str(output),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cli" / "tempest.model").is_file()
    assert f"{output}.model" in result.stdout


def test_cli_reports_missing_input_as_a_message(tmp_path: Path) -> None:
    cli = runpy.run_path(str(REPO_ROOT / "tools" / "train_tokenizer.py"))
    with pytest.raises(SystemExit) as exit_info:
        cli["main"](["--input", "no/such/dir", "--vocab-size", "400", "--output", str(tmp_path)])
    assert "--input entry 'no/such/dir' matches no file" in str(exit_info.value.code)


def test_hugging_face_tokenizer_json_round_trips(tmp_path: Path) -> None:
    tokenizer = open_tokenizer(str(train_hf_tokenizer(tmp_path / "tokenizer.json", HAMLET)))
    assert isinstance(tokenizer, HuggingFaceTokenizer)
    assert tokenizer.eod_id == 0 and tokenizer.vocab_size == 400
    for text in ROUND_TRIP_TEXTS:
        ids = tokenizer.encode(text)
        assert tokenizer.eod_id not in ids
        assert tokenizer.decode(ids + [tokenizer.eod_id]) == text
    assert tokenizer.encode_batch(ROUND_TRIP_TEXTS) == [
        tokenizer.encode(t) for t in ROUND_TRIP_TEXTS
    ]


def test_hugging_face_end_of_document_token_is_found_or_asked_for(tmp_path: Path) -> None:
    path = train_hf_tokenizer(tmp_path / "tokenizer.json", HAMLET, eod="<my_end>")
    with pytest.raises(ValueError, match="--eod-token"):
        open_tokenizer(str(path))
    assert open_tokenizer(str(path), eod_token="<my_end>").eod_id == 0


def test_open_tokenizer_picks_by_name(hamlet_model: Path) -> None:
    assert isinstance(open_tokenizer("byte"), ByteTokenizer)
    assert isinstance(open_tokenizer(str(hamlet_model)), SentencePieceTokenizer)
    with pytest.raises(FileNotFoundError):
        open_tokenizer("missing/tokenizer.json")


def test_encode_batch_equals_encoding_one_by_one(hamlet_model: Path) -> None:
    for tokenizer in (ByteTokenizer(), SentencePieceTokenizer(hamlet_model)):
        assert tokenizer.encode_batch(ROUND_TRIP_TEXTS) == [
            tokenizer.encode(t) for t in ROUND_TRIP_TEXTS
        ]


def test_special_tokens_become_single_pieces(tmp_path: Path) -> None:
    lines = HAMLET.read_text().splitlines()
    model = train_sentencepiece_on_lines(
        lines, tmp_path / "chat", vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>"]
    )
    tokenizer = SentencePieceTokenizer(model)
    text = "<|im_start|>user\nTo be?<|im_end|>"
    ids = tokenizer.encode(text)
    assert tokenizer._processor.piece_to_id("<|im_start|>") in ids
    assert tokenizer._processor.piece_to_id("<|im_end|>") == ids[-1]
    assert tokenizer.decode(ids) == text


def test_sampled_training_reads_a_bounded_number_of_lines(tmp_path: Path) -> None:
    lines = HAMLET.read_text().splitlines()
    first = train_sentencepiece_on_lines(
        lines, tmp_path / "a", vocab_size=400, max_sentences=500, seed=3
    )
    again = train_sentencepiece_on_lines(
        lines, tmp_path / "b", vocab_size=400, max_sentences=500, seed=3
    )
    full = train_sentencepiece_on_lines(lines, tmp_path / "c", vocab_size=400)
    pieces = [SentencePieceTokenizer(m).pieces() for m in (first, again, full)]
    assert pieces[0] == pieces[1]
    assert pieces[0] != pieces[2]


def test_identity_follows_the_vocabulary_not_the_file(tmp_path: Path, hamlet_model: Path) -> None:
    retrained = train_sentencepiece([HAMLET], tmp_path / "elsewhere" / "hamlet", vocab_size=400)
    assert retrained.read_bytes() != hamlet_model.read_bytes()
    same = tokenizer_identity(SentencePieceTokenizer(retrained))
    assert same == tokenizer_identity(SentencePieceTokenizer(hamlet_model))
    other = train_sentencepiece([HAMLET], tmp_path / "bigger", vocab_size=500)
    assert tokenizer_identity(SentencePieceTokenizer(other))["vocab_sha256"] != same["vocab_sha256"]
    assert tokenizer_identity(ByteTokenizer()) == {
        "kind": "ByteTokenizer",
        "vocab_sha256": None,
        "vocab_size": 257,
        "eod_id": 256,
    }


@pytest.fixture()
def chinese_with_rare_characters(tmp_path: Path) -> Path:
    """100 common Han characters 2,500 times each, and 100 rare ones once: 200 distinct
    characters, more than a 400-piece vocabulary holds beside its 256 byte pieces."""
    rng = random.Random(0)
    common = [chr(0x4E00 + i) for i in range(100)]
    lines = []
    for _ in range(100):
        rng.shuffle(common)
        lines.append("".join(common))
    rare = [chr(0x4E00 + 100 + i) for i in range(100)]
    path = tmp_path / "zh.txt"
    path.write_text("\n".join(lines * 25 + rare) + "\n", encoding="utf-8")
    return path


def test_chinese_trains_at_the_coverage_its_script_calls_for(
    chinese_with_rare_characters: Path, tmp_path: Path, capsys
) -> None:
    cli = runpy.run_path(str(REPO_ROOT / "tools" / "train_tokenizer.py"))
    args = ["--input", str(chinese_with_rare_characters), "--vocab-size", "400"]
    cli["main"]([*args, "--output", str(tmp_path / "zh")])
    tokenizer = SentencePieceTokenizer(tmp_path / "zh.model")
    text = chinese_with_rare_characters.read_text().splitlines()[-1]  # a rare character
    assert tokenizer.decode(tokenizer.encode(text)) == text  # by byte fallback
    with pytest.raises(SystemExit) as exit_info:
        cli["main"]([*args, "--character-coverage", "1", "--output", str(tmp_path / "full")])
    message = str(exit_info.value.code)
    assert "--vocab-size 400 is smaller than the 461 pieces" in message
    assert "lower --character-coverage" in message and "character_coverage" not in message
