"""Chat rendering with loss masks: which tokens are trained on, one BOS, bad lines skipped and
counted, and a template that leaves nothing to train on refused by name."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llmscale.data.tokenizer import ByteTokenizer, open_tokenizer
from llmscale.prep.chat import (
    CHATML, BadExample, ChatTemplate, UnsupervisedExample, find_chat_template, parse_example,
    tokenize_conversation,
)
from llmscale.prep.chat_dataset import read_example

REPO_ROOT = Path(__file__).resolve().parents[2]
CONVERSATION = [
    {"role": "system", "content": "Answer in verse."},
    {"role": "user", "content": "Who art thou?"},
    {"role": "assistant", "content": "A player."},
    {"role": "user", "content": "And then?"},
    {"role": "assistant", "content": "Exit, pursued."},
]
LLAMA3_LIKE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}"
    "<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def trained_text(ids, mask, tokenizer) -> str:
    return tokenizer.decode([i for i, m in zip(ids, mask) if m])


def test_only_assistant_turns_are_trained_on_with_their_end_of_turn_marker():
    tokenizer = ByteTokenizer()
    ids, mask = tokenize_conversation(CONVERSATION, ChatTemplate(CHATML, "ChatML"), tokenizer)
    assert len(ids) == len(mask)
    assert tokenizer.decode(ids) == ChatTemplate(CHATML, "ChatML").render(CONVERSATION, False)
    assert trained_text(ids, mask, tokenizer) == "A player.<|im_end|>\nExit, pursued.<|im_end|>\n"


def test_train_on_prompt_trains_on_every_token():
    ids, mask = tokenize_conversation(CONVERSATION, ChatTemplate(CHATML, "ChatML"),
                                      ByteTokenizer(), train_on_prompt=True)
    assert mask == [1] * len(ids)


def test_a_template_that_renders_no_assistant_token_is_an_error():
    users_only = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}"
                  "{% endif %}{% endfor %}")
    with pytest.raises(UnsupervisedExample, match="renders no assistant token"):
        tokenize_conversation(CONVERSATION, ChatTemplate(users_only, "users-only"),
                              ByteTokenizer())


@pytest.mark.parametrize(("line", "reason"), [
    ("{not json", "broken_json"),
    ("[1, 2]", "not_an_object"),
    ('{"text": "plain"}', "no_conversation"),
    ('{"messages": [{"role": "narrator", "content": "x"}]}', "bad_role"),
    ('{"messages": [{"role": "user", "content": 3}]}', "bad_content"),
    ('{"messages": [{"role": "user", "content": "hello"}]}', "no_assistant"),
])
def test_unusable_lines_say_why(line, reason):
    with pytest.raises(BadExample) as bad:
        parse_example(line)
    assert bad.value.reason == reason


def test_prompt_response_pairs_are_one_exchange():
    assert parse_example('{"prompt": "Q?", "response": "A."}') == [
        {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]


def _hf_tokenizer_folder(folder: Path) -> Path:
    specials = ["<s>", "</s>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tokenizer = HFTokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([m["content"] for m in CONVERSATION] * 20, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": LLAMA3_LIKE}))
    return folder / "tokenizer.json"


def test_the_tokenizers_own_template_and_exactly_one_bos(tmp_path):
    path = _hf_tokenizer_folder(tmp_path / "tok")
    tokenizer = open_tokenizer(str(path), eod_token="</s>")
    template = find_chat_template(path, None)
    assert template.origin.endswith("tokenizer_config.json") and template.bos_token == "<s>"
    ids, mask = tokenize_conversation(CONVERSATION, template, tokenizer)
    bos = tokenizer.encode("<s>")[0]
    assert ids[0] == bos and ids.count(bos) == 1  # the template's {{ bos_token }} is not doubled
    assert trained_text(ids, mask, tokenizer) == "A player.<|eot_id|>Exit, pursued.<|eot_id|>"
    # A chat_template.jinja beside the tokenizer takes precedence, as in transformers.
    (path.parent / "chat_template.jinja").write_text(CHATML)
    assert find_chat_template(path, None).source == CHATML
    assert find_chat_template(None, None).origin == "ChatML (the default)"


def _run_tool(*args):
    return subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "prepare_sft.py"), *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_tool_writes_tokens_and_masks_and_counts_skipped_lines(tmp_path):
    data = tmp_path / "chat.jsonl"
    lines = [json.dumps({"messages": CONVERSATION}),
             json.dumps({"prompt": "Name a play.", "response": "Hamlet."}),
             "{broken", json.dumps({"messages": [{"role": "user", "content": "alone"}]}), ""]
    data.write_text("\n".join(lines))
    result = _run_tool("--input", str(data), "--tokenizer", "byte", "--output",
                       str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (report["lines"], report["examples"]) == (4, 2)
    assert report["skipped"] == {"broken_json": 1, "no_assistant": 1}
    tokenizer = ByteTokenizer()
    ids, mask, text = read_example(tmp_path / "out" / "chat", 1, tokenizer)
    assert len(ids) == len(mask) and ids[-1] == tokenizer.eod_id and mask[-1] == 0
    assert text == "Hamlet.<|im_end|>\n"
    assert report["supervised_tokens"] == sum(
        int(read_example(tmp_path / "out" / "chat", i)[1].sum()) for i in range(2))


def test_tool_refuses_an_example_with_nothing_to_train_on_naming_it(tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"prompt": "Q", "response": "A"}) + "\n")
    template = tmp_path / "users_only.jinja"
    template.write_text("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}"
                        "{% endif %}{% endfor %}")
    result = _run_tool("--input", str(data), "--tokenizer", "byte", "--output",
                       str(tmp_path / "out"), "--chat-template", str(template))
    assert result.returncode == 2
    assert f"{data}:1: the chat template ({template}) renders no assistant token" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "chat.idx").exists()


def test_the_bundled_example_prepares_as_the_readme_shows(tmp_path):
    result = _run_tool("--input", str(REPO_ROOT / "data" / "chat" / "example.jsonl"),
                       "--tokenizer", "byte", "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (report["lines"], report["examples"], report["skipped"]) == (5, 5, {})
    assert 0 < report["supervised_tokens"] < report["tokens"]
