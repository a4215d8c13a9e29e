"""Preference pairs (DPO data) rendered with the chat template into two masked datasets.

A line holds `prompt`, `chosen` and `rejected`: strings (a user prompt, assistant responses) or
message lists as in the chat data (the prompt: the conversation before the answer; each
response: its assistant turn or turns). Each response is rendered after the prompt as the
assistant turn, and only the response's tokens are marked, found by growing prefixes as for
supervised fine-tuning; earlier assistant turns of the prompt are context.

Stored as `<output>/chosen` and `<output>/rejected`, each a Megatron `.bin/.idx` with its
`_loss_mask` twin, all four with the same document index: pair i is document i of each (two
files rather than interleaved documents, so a sampler picks pair i by one index and the chosen
and rejected halves cannot fall into different micro-batches). A pair whose chosen equals its
rejected, or with an empty response, teaches nothing and is skipped and counted.
"""

import json
from pathlib import Path
from typing import Dict, List, Tuple

from llmscale.data.preference_pairs import PAIR_SIDES as SIDES
from llmscale.data.tokenizer import Tokenizer, tokenizer_identity
from llmscale.prep.chat import BadExample, ChatTemplate, checked_messages, tokenize_conversation
from llmscale.prep.chat_dataset import (
    ChatReport, MaskedDocuments, converted_lines, no_usable_lines, with_end_of_document,
    write_reports,
)

Messages = List[Dict[str, str]]


def parse_pair(line: str) -> Tuple[Messages, Messages, Messages]:
    """The prompt and the two responses of one JSONL line, or `BadExample` saying why not."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise BadExample("broken_json", f"not JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise BadExample("not_an_object", "not a JSON object")
    missing = [key for key in ("prompt", *SIDES) if key not in record]
    if missing:
        raise BadExample("not_a_pair", f"has no {' or '.join(f'`{k}`' for k in missing)}")
    prompt = _messages(record["prompt"], "prompt", "user")
    if prompt[-1]["role"] == "assistant":
        raise BadExample("bad_prompt", "`prompt` ends with an assistant turn, not a question")
    chosen, rejected = (_messages(record[side], side, "assistant") for side in SIDES)
    for response in (chosen, rejected):
        if any(m["role"] != "assistant" for m in response):
            raise BadExample("bad_response", "a response holds a turn that is not the assistant's")
        if not "".join(m["content"] for m in response).strip():
            raise BadExample("empty_response", "a response is empty")
    if chosen == rejected:
        raise BadExample("chosen_equals_rejected", "`chosen` equals `rejected`")
    return prompt, chosen, rejected


def _messages(value, name: str, role: str) -> Messages:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return checked_messages(value, name)


def tokenize_pair(prompt: Messages, chosen: Messages, rejected: Messages,
                  template: ChatTemplate, tokenizer: Tokenizer):
    """((ids, mask) of the chosen conversation, (ids, mask) of the rejected one); each mask
    marks that response's tokens only."""
    return tuple(tokenize_conversation(prompt + response, template, tokenizer,
                                       supervised_from=len(prompt))
                 for response in (chosen, rejected))


def write_preference_dataset(inputs: List[Path], output: Path, tokenizer: Tokenizer,
                             template: ChatTemplate, warn=print) -> ChatReport:
    """`output/{chosen,rejected}.bin/.idx` and their `_loss_mask` twins, `dataset.json` and
    `report.json` (`examples` counts the pairs written)."""
    output.mkdir(parents=True, exist_ok=True)
    documents = {side: MaskedDocuments(output / side, tokenizer.vocab_size) for side in SIDES}
    report = ChatReport()

    def convert(line: str):
        return tokenize_pair(*parse_pair(line), template, tokenizer)

    for pair in converted_lines(inputs, convert, report, warn):
        for side, (ids, mask) in zip(SIDES, pair):
            ids, mask = with_end_of_document(ids, mask, tokenizer)
            documents[side].add(ids, mask)
            report.tokens += len(ids)
            report.supervised_tokens += sum(mask)
        report.examples += 1
    if report.examples == 0:
        raise no_usable_lines(inputs, report, "preference pair")
    for side in SIDES:
        documents[side].finish()
    write_reports(output, report, {
        "tokenizer": tokenizer_identity(tokenizer), "chat_template": template.origin,
        "kind": "preference_pairs", "datasets": list(SIDES), "documents": report.examples,
        "tokens": report.tokens})
    return report
