"""The evaluation tasks behind one interface, for `tools/evaluate.py` and the training loop's
`train.evaluators` alike: an `EvaluatorConfig`'s examples are read once (`prepare_task`), then
run on a model split over the ranks (`run_task`), and the results named for a run's metrics
(`run_metrics`)."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Union

from llmscale.config.evaluator_rules import evaluator_name
from llmscale.config.schema import EvaluatorConfig, EvaluatorTask
from llmscale.data import Tokenizer
from llmscale.eval.exact_match import evaluate_exact_match, read_questions
from llmscale.eval.model_source import LoadedModel
from llmscale.eval.multiple_choice import evaluate_choices, read_choices
from llmscale.eval.perplexity import evaluate_perplexity, token_stream
from llmscale.eval.ranks import Ranks


@dataclass(frozen=True)
class PreparedTask:
    spec: EvaluatorConfig
    # The `<name>` of its metrics, `eval/<name>/<metric>`.
    name: str
    # What it reads, for reports.
    source: str
    # Its examples (choice, exact_match), or the token ids to score (perplexity).
    inputs: Any


def prepare_task(spec: EvaluatorConfig, tokenizer: Tokenizer, root: Path,
                 setting: str) -> PreparedTask:
    """Relative paths start at `root`; `setting` names the data's option in errors."""
    if spec.task is EvaluatorTask.perplexity:
        return PreparedTask(spec, evaluator_name(spec), " ".join(spec.data),
                            token_stream(spec.data, tokenizer, root, setting))
    examples = Path(spec.examples).expanduser()
    examples = examples if examples.is_absolute() else root / examples
    read = read_choices if spec.task is EvaluatorTask.choice else read_questions
    return PreparedTask(spec, evaluator_name(spec), spec.examples, read(examples, spec.limit))


def run_task(task: PreparedTask, loaded: LoadedModel, ranks: Ranks) -> Dict:
    """The task's results: "metrics", and "samples" or "timing" where it has them."""
    spec = task.spec
    if spec.task is EvaluatorTask.perplexity:
        return evaluate_perplexity(loaded, task.inputs, ranks, spec.seq_len, spec.batch_size,
                                   spec.limit)
    if spec.task is EvaluatorTask.choice:
        return evaluate_choices(loaded, task.inputs, ranks, spec.delimiter)
    return evaluate_exact_match(loaded, task.inputs, ranks, spec.max_new_tokens,
                                spec.chat_template, spec.contains, spec.first_line)


def run_metrics(name: str, metrics: Dict[str, Any]) -> Dict[str, Union[int, float]]:
    """The numbers among `metrics` as `eval/<name>/<metric>` (the settings echoed as flags,
    such as exact match's `contains`, stay out)."""
    return {f"eval/{name}/{metric}": value for metric, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}
