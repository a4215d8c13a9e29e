"""Multiple choice by likelihood: of an example's `choices`, the model picks the one whose tokens
it gives the highest summed log-probability after the `context` (acc), or the highest per
character of the choice (acc_norm, as lm-evaluation-harness normalises, so long answers are not
penalised for their length). Examples are JSONL lines `{"context", "choices", "label"}`."""

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

from llmscale.eval.examples import read_jsonl, text_field
from llmscale.eval.model_source import LoadedModel
from llmscale.eval.ranks import Ranks
from llmscale.eval.scoring import continuation_logprobs


@dataclass(frozen=True)
class Choice:
    context: str
    choices: List[str]
    label: int


def parse_choice(record: dict) -> Choice:
    context = text_field(record, "context")
    choices = record.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(
            isinstance(choice, str) and choice for choice in choices):
        raise ValueError(f"'choices' must be a list of at least two non-empty strings, got "
                         f"{choices!r}")
    label = record.get("label")
    if not isinstance(label, int) or isinstance(label, bool):
        raise ValueError(f"'label' must be an integer index into 'choices', got {label!r}")
    if not 0 <= label < len(choices):
        raise ValueError(f"label {label} is out of range for {len(choices)} choices "
                         f"(0 to {len(choices) - 1})")
    return Choice(context, choices, label)


def read_choices(path: Path, limit: int = 0) -> List[Choice]:
    return read_jsonl(path, parse_choice, limit)


def evaluate_choices(loaded: LoadedModel, examples: List[Choice], ranks: Ranks,
                     delimiter: str = " ") -> Dict:
    """acc and acc_norm, and per example the scores; `delimiter` goes between context and choice
    (lm-evaluation-harness's target delimiter)."""
    tokenizer = loaded.tokenizer
    mine = {}
    for index, example in ranks.share(examples).items():
        # An empty context still needs a token to predict from: the end of a document.
        context = tokenizer.encode(example.context) or [tokenizer.eod_id]
        requests = [(context, tokenizer.encode(delimiter + choice)) for choice in example.choices]
        mine[index] = [float(scores.double().sum())
                       for scores in continuation_logprobs(loaded.model, requests)]
    samples = []
    for example, logliks in zip(examples, ranks.gather(mine)):
        per_char = [loglik / len(choice) for loglik, choice in zip(logliks, example.choices)]
        samples.append({"label": example.label, "loglikelihoods": logliks,
                        "pred": _argmax(logliks), "pred_norm": _argmax(per_char)})
    count = len(samples)
    return {
        "metrics": {
            "acc": sum(s["pred"] == s["label"] for s in samples) / count,
            "acc_norm": sum(s["pred_norm"] == s["label"] for s in samples) / count,
            "examples": count,
        },
        "samples": samples,
    }


def _argmax(values: List[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)
