"""Exact match of greedy generations: JSONL lines `{"prompt", "answer"}` (an answer may be a list
of accepted strings). Generation and answer are compared normalised (lower case, punctuation
dropped, whitespace collapsed); with `contains`, an answer found anywhere in the generation also
counts; with `first_line`, only the generation's first non-empty line is compared (a base model
continues past its answer)."""

import re
import string
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

from llmscale.eval.examples import read_jsonl, text_field
from llmscale.eval.generate import greedy_generate
from llmscale.eval.model_source import LoadedModel
from llmscale.eval.ranks import Ranks

_PUNCTUATION = str.maketrans("", "", string.punctuation)


@dataclass(frozen=True)
class Question:
    prompt: str
    answers: List[str]


def parse_question(record: dict) -> Question:
    prompt = text_field(record, "prompt")
    answer = record.get("answer")
    answers = answer if isinstance(answer, list) else [answer]
    if not answers or not all(isinstance(a, str) and normalise(a) for a in answers):
        raise ValueError(f"'answer' must be a non-empty string or a list of them, got {answer!r}")
    return Question(prompt, answers)


def read_questions(path: Path, limit: int = 0) -> List[Question]:
    return read_jsonl(path, parse_question, limit)


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower().translate(_PUNCTUATION)).strip()


def is_match(generation: str, answers: List[str], contains: bool) -> bool:
    said = normalise(generation)
    return any(normalise(a) == said or (contains and _contains_words(said, normalise(a)))
               for a in answers)


def _contains_words(text: str, answer: str) -> bool:
    return f" {answer} " in f" {text} "


def evaluate_exact_match(loaded: LoadedModel, questions: List[Question], ranks: Ranks,
                         max_new_tokens: int = 32, chat: bool = True,
                         contains: bool = False, first_line: bool = False) -> Dict:
    """The share of questions answered; `chat` puts each prompt in the tokenizer's chat template
    as a user turn, when it has one."""
    tokenizer, template = loaded.tokenizer, loaded.chat_template if chat else None
    mine = {}
    started = time.perf_counter()
    for index, question in ranks.share(questions).items():
        prompt = question.prompt
        if template is not None:
            prompt = template.render([{"role": "user", "content": prompt}],
                                     add_generation_prompt=True)
        new = greedy_generate(loaded.model, tokenizer.encode(prompt), max_new_tokens,
                              loaded.stop_ids, tokenizer.vocab_size)
        mine[index] = {"generation": tokenizer.decode(new), "new_tokens": len(new)}
    seconds = time.perf_counter() - started
    samples = []
    for question, result in zip(questions, ranks.gather(mine)):
        said = result["generation"]
        if first_line:
            said = next((line for line in said.splitlines() if line.strip()), "")
        samples.append({**result, "answers": question.answers,
                        "match": is_match(said, question.answers, contains)})
    return {
        "metrics": {
            "exact_match": sum(s["match"] for s in samples) / len(samples),
            "examples": len(samples),
            "chat_template": template is not None,
            "contains": contains,
            "first_line": first_line,
        },
        "samples": samples,
        "timing": {"rank0_seconds": round(seconds, 3),
                   "rank0_new_tokens": sum(r["new_tokens"] for r in mine.values())},
    }
