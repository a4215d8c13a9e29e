"""The masked-LM mask token of each tokenizer kind, and the error naming how to get one."""

import importlib.util
import json
from pathlib import Path

import pytest
import tokenizers
from corpus_fixtures import train_hf_tokenizer

from llmscale.data.tokenizer import (
    ByteTokenizer, HuggingFaceTokenizer, SentencePieceTokenizer, mask_token_id,
    train_sentencepiece_on_lines,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
HAMLET = REPO_ROOT / "data" / "shakespeare" / "hamlet.txt"
LINES = HAMLET.read_text().splitlines()[:200]
_SPEC = importlib.util.spec_from_file_location("train_tokenizer",
                                               REPO_ROOT / "tools/train_tokenizer.py")
train_tokenizer = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(train_tokenizer)


def test_the_byte_tokenizer_reserves_id_257_when_asked():
    with pytest.raises(ValueError, match=r"the tokenizer has no mask token: .*with_mask=True"):
        mask_token_id(ByteTokenizer())
    tokenizer = ByteTokenizer(with_mask=True)
    assert (mask_token_id(tokenizer), tokenizer.vocab_size, tokenizer.eod_id) == (257, 258, 256)
    assert tokenizer.encode("<mask>") == ByteTokenizer().encode("<mask>")  # text never maps to it
    assert tokenizer.decode([104, 257, 105]) == "hi"


def test_sentencepiece_training_adds_the_mask_piece(tmp_path):
    with_mask = SentencePieceTokenizer(train_sentencepiece_on_lines(
        LINES, tmp_path / "masked", 400, special_tokens=["<mask>"]))
    mask_id = mask_token_id(with_mask)
    # One piece (after SentencePiece's word-start piece), decoding as itself.
    assert with_mask.encode("<mask>")[-1:] == [mask_id]
    assert with_mask.decode([mask_id]) == "<mask>"
    without = SentencePieceTokenizer(train_sentencepiece_on_lines(LINES, tmp_path / "plain", 400))
    with pytest.raises(ValueError, match=r"has no '<mask>' piece: .*--special-tokens '<mask>'"):
        mask_token_id(without)


def test_the_train_tokenizer_tool_passes_special_tokens(tmp_path):
    (tmp_path / "lines.txt").write_text("\n".join(LINES))
    # In this process: the tool's own start-up is the slow part.
    train_tokenizer.main(["--input", str(tmp_path / "lines.txt"), "--vocab-size", "400",
                          "--special-tokens", "<mask>", "--output", str(tmp_path / "t")])
    tokenizer = SentencePieceTokenizer(tmp_path / "t.model")
    assert tokenizer.encode("<mask>")[-1:] == [mask_token_id(tokenizer)]


def test_a_tokenizer_json_gives_its_mask_token_or_the_named_one(tmp_path):
    (tmp_path / "lines.txt").write_text("\n".join(LINES))
    path = train_hf_tokenizer(tmp_path / "tokenizer.json", tmp_path / "lines.txt")
    with pytest.raises(ValueError, match=r"defines none of \['<mask>', '\[MASK\]'\]"):
        mask_token_id(HuggingFaceTokenizer(path))
    model = tokenizers.Tokenizer.from_file(str(path))
    model.add_special_tokens(["[MASK]", "<special>"])
    model.save(str(path))
    assert mask_token_id(HuggingFaceTokenizer(path)) == model.token_to_id("[MASK]")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"mask_token": {"content": "<special>"}}))
    assert mask_token_id(HuggingFaceTokenizer(path)) == model.token_to_id("<special>")
