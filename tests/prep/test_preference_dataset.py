"""Preference pairs: only each response is marked, pair i is document i of the chosen and the
rejected datasets, unusable pairs are skipped and counted, and a file without one is refused."""

import importlib.util
import json
from pathlib import Path

import pytest

from llmscale.data.tokenizer import ByteTokenizer
from llmscale.prep.chat import CHATML, BadExample, ChatTemplate
from llmscale.prep.chat_dataset import read_example
from llmscale.prep.preference_dataset import parse_pair, tokenize_pair, write_preference_dataset

REPO_ROOT = Path(__file__).resolve().parents[2]
CHATML_TEMPLATE = ChatTemplate(CHATML, "ChatML")
_SPEC = importlib.util.spec_from_file_location("prepare_sft", REPO_ROOT / "tools/prepare_sft.py")
prepare_sft = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(prepare_sft)
MULTI_TURN = {
    "prompt": [{"role": "user", "content": "A play?"}, {"role": "assistant", "content": "Lear."},
               {"role": "user", "content": "Another?"}],
    "chosen": "Othello.", "rejected": [{"role": "assistant", "content": "Lear again."}],
}


def marked(ids, mask, tokenizer) -> str:
    return tokenizer.decode([i for i, m in zip(ids, mask) if m])


def test_only_the_final_response_is_marked_and_the_prompt_tokens_are_shared():
    tokenizer = ByteTokenizer()
    (chosen, chosen_mask), (rejected, rejected_mask) = tokenize_pair(
        *parse_pair(json.dumps(MULTI_TURN)), CHATML_TEMPLATE, tokenizer)
    # The prompt's earlier assistant turn ("Lear.") is context, not trained on.
    assert marked(chosen, chosen_mask, tokenizer) == "Othello.<|im_end|>\n"
    assert marked(rejected, rejected_mask, tokenizer) == "Lear again.<|im_end|>\n"
    prompt = chosen_mask.index(1)
    assert prompt == rejected_mask.index(1) and chosen[:prompt] == rejected[:prompt]
    assert tokenizer.decode(chosen[:prompt]) == CHATML_TEMPLATE.render(MULTI_TURN["prompt"], True)


@pytest.mark.parametrize(("record", "reason"), [
    ({"prompt": "Q?", "chosen": "A."}, "not_a_pair"),
    ({"prompt": "Q?", "chosen": "A.", "rejected": "A."}, "chosen_equals_rejected"),
    ({"prompt": "Q?", "chosen": " ", "rejected": "B."}, "empty_response"),
    ({"prompt": "Q?", "chosen": "A.", "rejected": []}, "no_conversation"),
    ({"prompt": [{"role": "assistant", "content": "A."}], "chosen": "A.", "rejected": "B."},
     "bad_prompt"),
    ({"prompt": "Q?", "chosen": [{"role": "user", "content": "A."}], "rejected": "B."},
     "bad_response"),
])
def test_unusable_pairs_say_why(record, reason):
    with pytest.raises(BadExample) as bad:
        parse_pair(json.dumps(record))
    assert bad.value.reason == reason


def test_a_file_with_no_usable_pair_is_refused_naming_it(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Q?", "chosen": "A.", "rejected": "A."}) + "\n")
    with pytest.raises(ValueError, match=f"no usable preference pair in .*{data}.*"
                                         "chosen_equals_rejected 1"):
        write_preference_dataset([data], tmp_path / "out", ByteTokenizer(), CHATML_TEMPLATE,
                                 warn=lambda _: None)
    assert not (tmp_path / "out" / "chosen.idx").exists()


def test_tool_writes_pairs_as_the_same_document_of_each_dataset(tmp_path):
    data = tmp_path / "pairs.jsonl"
    lines = [json.dumps({"prompt": "Name a play.", "chosen": "Hamlet.", "rejected": "Hamnet."}),
             json.dumps(MULTI_TURN), "{broken",
             json.dumps({"prompt": "Q?", "chosen": "Same.", "rejected": "Same."}), ""]
    data.write_text("\n".join(lines))
    # In this process: the tool's own start-up (torch, megatron imports) is the slow part.
    assert prepare_sft.main(["--pairs", "--input", str(data),
                             str(REPO_ROOT / "data" / "chat" / "pairs_example.jsonl"),
                             "--tokenizer", "byte", "--output", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (report["lines"], report["examples"]) == (8, 6)
    assert report["skipped"] == {"broken_json": 1, "chosen_equals_rejected": 1}
    tokenizer = ByteTokenizer()
    texts = {side: [read_example(tmp_path / "out" / side, i, tokenizer)[2] for i in range(6)]
             for side in ("chosen", "rejected")}
    assert (texts["chosen"][1], texts["rejected"][1]) == ("Othello.<|im_end|>\n",
                                                          "Lear again.<|im_end|>\n")
    assert texts["chosen"][5] == "Titania.<|im_end|>\n"
    ids, mask, _ = read_example(tmp_path / "out" / "rejected", 0, tokenizer)
    assert ids[-1] == tokenizer.eod_id and mask[-1] == 0
    assert report["supervised_tokens"] == sum(
        int(read_example(tmp_path / "out" / side, i)[1].sum())
        for side in ("chosen", "rejected") for i in range(6))
