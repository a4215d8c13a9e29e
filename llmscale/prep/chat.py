"""Chat and instruction examples rendered with a chat template into token ids and a loss mask.

An example is a JSON object with `messages` (a list of {"role": system|user|assistant,
"content": str}) or with `prompt` and `response` strings. It is rendered with the tokenizer's
own chat template (`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`, beside
a `tokenizer.json`) or with ChatML. The mask marks the tokens trained on: by default each
assistant turn as the template renders it (its end-of-turn marker included), found by rendering
growing prefixes of the conversation, so no `{% generation %}` tags are needed. Each piece of
rendered text is tokenized on its own and the pieces concatenated, so the mask's boundaries are
exactly the template's.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmscale.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class BadExample(ValueError):
    """An input line that is not a usable example (broken JSON, missing roles): skipped and
    counted."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class UnsupervisedExample(ValueError):
    """An example whose rendering leaves no token to train on: an error, never a silent mask."""


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    # Where it came from, for reports and errors.
    origin: str
    bos_token: Optional[str] = None

    def render(self, messages: List[Dict[str, str]], add_generation_prompt: bool) -> str:
        template = _environment().from_string(self.source)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=self.bos_token or "", eos_token="")


def _environment() -> ImmutableSandboxedEnvironment:
    # Hugging Face renders chat templates in a sandbox with these options; the same here.
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = _raise_template_error
    return environment


def _raise_template_error(message: str):
    raise BadExample("template_refused", f"the chat template refused it: {message}")


def find_chat_template(tokenizer_path: Optional[Path],
                       template_file: Optional[Path]) -> ChatTemplate:
    """`template_file` if given; else the template beside a `tokenizer.json`; else ChatML."""
    config = _tokenizer_config(tokenizer_path)
    bos = config.get("bos_token")
    bos_token = bos.get("content") if isinstance(bos, dict) else bos
    if template_file:
        return ChatTemplate(template_file.read_text(), str(template_file), bos_token)
    if tokenizer_path is not None:
        jinja = tokenizer_path.parent / "chat_template.jinja"
        if jinja.is_file():
            return ChatTemplate(jinja.read_text(), str(jinja), bos_token)
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template:
            return ChatTemplate(template, str(tokenizer_path.parent / "tokenizer_config.json"),
                                bos_token)
    return ChatTemplate(CHATML, "ChatML (the default)", bos_token)


def _tokenizer_config(tokenizer_path: Optional[Path]) -> Dict[str, Any]:
    if tokenizer_path is None:
        return {}
    path = tokenizer_path.parent / "tokenizer_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def parse_example(line: str) -> List[Dict[str, str]]:
    """The conversation in one JSONL line, or `BadExample` saying why it is unusable."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise BadExample("broken_json", f"not JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise BadExample("not_an_object", "not a JSON object")
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record and "response" in record:
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["response"]}]
    else:
        raise BadExample("no_conversation", "has neither `messages` nor `prompt` and `response`")
    messages = checked_messages(messages, "messages")
    if not any(message["role"] == "assistant" for message in messages):
        raise BadExample("no_assistant", "no assistant message")
    return messages


def checked_messages(messages: Any, name: str) -> List[Dict[str, str]]:
    """`messages` (the field `name` of a line) as role/content dicts, or `BadExample`."""
    if not isinstance(messages, list) or not messages:
        raise BadExample("no_conversation", f"`{name}` is not a non-empty list")
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise BadExample("bad_role", f"a message without a role among {list(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise BadExample("bad_content", "a message whose content is not a string")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def tokenize_conversation(messages: List[Dict[str, str]], template: ChatTemplate,
                          tokenizer: Tokenizer, train_on_prompt: bool = False,
                          supervised_from: int = 0) -> Tuple[List[int], List[int]]:
    """Token ids and their loss mask (1: a token trained on), with one BOS first when the
    template's tokenizer has one. Only the assistant turns at `supervised_from` or after are
    trained on (a preference pair's earlier turns are its prompt). `UnsupervisedExample` if
    nothing is trained on."""
    pieces: List[Tuple[str, int]] = []  # (text, supervised)
    rendered = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant" or index < supervised_from:
            continue
        prompt = template.render(messages[:index], add_generation_prompt=True)
        answered = template.render(messages[:index + 1], add_generation_prompt=False)
        for text, longer in ((rendered, prompt), (prompt, answered)):
            if not longer.startswith(text):
                raise UnsupervisedExample(
                    f"the chat template ({template.origin}) does not render the conversation's "
                    "prefixes as prefixes of each other, so the assistant turns cannot be found; "
                    "pass one that does with --chat-template, or --train-on-prompt")
        pieces += [(prompt[len(rendered):], 0), (answered[len(prompt):], 1)]
        rendered = answered
    whole = template.render(messages, add_generation_prompt=False)
    pieces.append((whole[len(rendered):], 0))

    ids: List[int] = []
    mask: List[int] = []
    bos_id = _bos_id(template, tokenizer)
    if bos_id is not None:
        ids.append(bos_id)
        mask.append(0)
    for index, (text, supervised) in enumerate(pieces):
        if index == 0 and template.bos_token and text.startswith(template.bos_token):
            text = text[len(template.bos_token):]  # exactly one BOS: the one added above
        piece_ids = tokenizer.encode(text) if text else []
        ids += piece_ids
        mask += [1 if supervised or train_on_prompt else 0] * len(piece_ids)
    if not any(mask):
        raise UnsupervisedExample(
            f"the chat template ({template.origin}) renders no assistant token to train on")
    return ids, mask


def _bos_id(template: ChatTemplate, tokenizer: Tokenizer) -> Optional[int]:
    if not template.bos_token:
        return None
    ids = tokenizer.encode(template.bos_token)
    if len(ids) != 1:
        raise ValueError(f"the BOS token {template.bos_token!r} of {template.origin} is not one "
                         "token of the tokenizer: use the tokenizer.json it belongs to")
    return ids[0]
