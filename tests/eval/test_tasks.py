"""Perplexity against transformers, multiple choice on a hand-made case, exact match's
normalisation, the model folders, and the errors a user meets."""

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from launching import load_tool
from test_scoring_and_generation import TINY, random_llama
from transformers import LlamaForCausalLM

from llmscale.checkpoint.hf import export_hf, save_weights
from llmscale.data import ByteTokenizer
from llmscale.eval.exact_match import is_match, normalise, read_questions
from llmscale.eval.model_source import LoadedModel, load_model, stop_ids
from llmscale.eval.multiple_choice import evaluate_choices, read_choices
from llmscale.eval.perplexity import evaluate_perplexity
from llmscale.eval.ranks import Ranks

TEXT = ("Full fathom five thy father lies; of his bones are coral made; those are pearls that "
        "were his eyes: nothing of him that doth fade, but doth suffer a sea-change into "
        "something rich and strange.\n") * 3
ONE_PROCESS = Ranks(rank=0, world_size=1, device=torch.device("cpu"))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" if isinstance(r, dict) else r + "\n"
                            for r in records))
    return path


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    export_hf(random_llama().state_dict(), TINY, folder)
    return folder


def test_perplexity_equals_transformers_on_the_exported_model(hf_folder):
    loaded = load_model(hf_folder, tokenizer="byte")
    tokens = torch.tensor(ByteTokenizer().encode(TEXT))
    ours = evaluate_perplexity(loaded, tokens, ONE_PROCESS, seq_len=32, batch_size=3)
    windows = (len(tokens) - 1) // 32
    assert ours["metrics"]["windows"] == windows and ours["metrics"]["tokens"] == windows * 32

    theirs = LlamaForCausalLM.from_pretrained(hf_folder).eval()
    inputs = torch.stack([tokens[i * 32:(i + 1) * 32] for i in range(windows)])
    labels = torch.stack([tokens[i * 32 + 1:(i + 1) * 32 + 1] for i in range(windows)])
    with torch.no_grad():
        logits = theirs(inputs).logits
    loss = F.cross_entropy(logits.flatten(0, 1).double(), labels.flatten()).item()
    assert ours["metrics"]["loss"] == pytest.approx(loss, rel=1e-5)
    assert ours["metrics"]["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)


def test_every_model_folder_kind_loads_the_same_model(hf_folder, tmp_path):
    save_weights(random_llama().state_dict(), TINY, tmp_path / "weights")
    tokens = torch.tensor([[5, 6, 7, 8]])
    from_hf, from_weights = (load_model(path, "byte").model for path in
                             (hf_folder, tmp_path / "weights"))
    with torch.no_grad():
        assert torch.equal(from_hf(tokens), from_weights(tokens))


class Bigram(torch.nn.Module):
    """After any token: 'a' with logit 3, 'b' with 2, every other byte 0, so log p(a) - log p(b)
    = 1 and the answers below follow by hand."""

    cfg = TINY

    def __init__(self):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.zeros(TINY.vocab_size))
        with torch.no_grad():
            self.logits[ord("a")], self.logits[ord("b")] = 3.0, 2.0

    def forward(self, input_ids):
        return self.logits.expand(*input_ids.shape, -1)


def test_multiple_choice_sums_for_acc_and_divides_by_characters_for_acc_norm(tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", [
        # sum: 'b' (-3.6) beats 'aaaa' (-10.6); per character 'aaaa' (-2.6) beats 'b'
        {"context": "x", "choices": ["b", "aaaa"], "label": 1},
        # 'a' wins both ways
        {"context": "", "choices": ["a", "bb"], "label": 0},
    ])
    loaded = LoadedModel(Bigram(), ByteTokenizer(), tmp_path)
    results = evaluate_choices(loaded, read_choices(path), ONE_PROCESS, delimiter="")
    assert results["metrics"] == {"acc": 0.5, "acc_norm": 1.0, "examples": 2}
    log_z = math.log(math.exp(3) + math.exp(2) + TINY.vocab_size - 2)
    assert results["samples"][0]["loglikelihoods"] == pytest.approx([2 - log_z, 4 * (3 - log_z)])
    assert [s["pred"] for s in results["samples"]] == [0, 0]


def test_exact_match_compares_normalised_text():
    assert normalise("  The  Tempest!\n") == "the tempest"
    assert is_match("the tempest.", ["The Tempest"], contains=False)
    assert not is_match("It is The Tempest.", ["The Tempest"], contains=False)
    assert is_match("It is The Tempest.", ["The Tempest"], contains=True)
    assert not is_match("Othello's", ["Othello"], contains=True)  # whole words only
    assert is_match("Lear", ["Hamlet", "Lear"], contains=False)


@pytest.mark.parametrize("line, message", [
    ('{"context": "a", "choices": ["x", "y"], "label": 2}',
     "line 2: label 2 is out of range for 2 choices (0 to 1)"),
    ('{"context": "a", "choices": ["x", "y"]', "line 2: Expecting"),
    ('{"context": "a", "choices": "xy", "label": 0}', "line 2: 'choices' must be a list"),
    ('{"prompt": "a", "choices": ["x", "y"], "label": 0}', "line 2: 'context' must be a string"),
])
def test_a_bad_choice_line_is_named_by_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "mc.jsonl",
                       [{"context": "a", "choices": ["x", "y"], "label": 0}, line])
    with pytest.raises(ValueError, match="mc.jsonl") as error:
        read_choices(path)
    assert message in str(error.value)


def test_a_question_without_an_answer_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "Which play?", "answer": "!"}])
    with pytest.raises(ValueError, match=r"qa.jsonl, line 1: 'answer' must be"):
        read_questions(path)


def test_an_encoder_is_refused(tmp_path):
    save_weights(random_llama().state_dict(), replace(TINY, causal=False), tmp_path)
    with pytest.raises(ValueError, match="model.causal=false"):
        load_model(tmp_path, "byte")


def test_the_command_names_a_missing_model_folder(tmp_path, capsys):
    examples = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "p", "answer": "a"}])
    code = load_tool("evaluate").main(["exact-match", str(tmp_path / "nowhere"),
                                       "--examples", str(examples)])
    assert code == 2
    assert f"{tmp_path / 'nowhere'}: no such model folder" in capsys.readouterr().err


def test_the_command_writes_its_results(hf_folder, tmp_path, capsys):
    examples = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "Full fathom", "answer": "five"}])
    output = tmp_path / "out.json"
    assert load_tool("evaluate").main(
        ["exact-match", str(hf_folder), "--tokenizer", "byte", "--examples", str(examples),
         "--max-new-tokens", "4", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert report["metrics"] == {"exact_match": 0.0, "examples": 1, "chat_template": False,
                                 "contains": False, "first_line": False}
    assert report["samples"][0]["new_tokens"] == 4
    assert "exact-match of" in capsys.readouterr().out


def test_a_run_stops_at_the_end_of_turn_its_tokenizer_folder_names(tmp_path):
    run_dir, hf_dir = tmp_path / "run", tmp_path / "hf"
    run_dir.mkdir(), hf_dir.mkdir()
    (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    (hf_dir / "config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert stop_ids(run_dir, hf_dir / "tokenizer.json", 0) == {0, 2, 7}
    assert stop_ids(run_dir, None, 5) == {5}
