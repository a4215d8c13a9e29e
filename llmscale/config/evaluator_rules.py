"""The rules of `train.evaluators`, for `validate`, and the name each evaluator logs under."""

from pathlib import Path
from typing import List

from llmscale.config.load import REPO_ROOT
from llmscale.config.schema import EvaluatorConfig, EvaluatorTask, LLMScaleConfig, Objective


def evaluator_name(spec: EvaluatorConfig) -> str:
    """`spec.name`, else the stem of its examples file or first data entry: the `<name>` of
    `eval/<name>/<metric>`."""
    if spec.name:
        return spec.name
    source = spec.examples if spec.examples else (spec.data[0] if spec.data else "")
    return Path(source).stem or spec.task.value


def evaluator_rules(cfg: LLMScaleConfig, root: Path = REPO_ROOT) -> List[str]:
    evaluators = cfg.train.evaluators
    if not evaluators:
        return []
    par = cfg.parallel
    errors = []
    if par.tp > 1 or par.pp > 1 or par.ep > 1:
        errors.append(
            f"train.evaluators run the whole model on each rank, which parallel.tp={par.tp}, "
            f"parallel.pp={par.pp}, parallel.ep={par.ep} split: use them with data parallelism "
            "(ZeRO 0-3) only, or evaluate the saved checkpoints with tools/evaluate.py")
    if not cfg.model.causal or cfg.objective is Objective.mlm:
        errors.append("train.evaluators score likelihoods and generate, which a bidirectional "
                      "encoder (objective=mlm) cannot: remove them (train.evaluators=[])")
    names = [evaluator_name(spec) for spec in evaluators]
    for index, (spec, name) in enumerate(zip(evaluators, names)):
        errors += _spec_rules(f"train.evaluators[{index}]", spec, root, cfg.model.max_seq_len)
        if names.count(name) > 1 and names.index(name) == index:
            errors.append(f"train.evaluators: {names.count(name)} evaluators log as eval/{name}/: "
                          "give each its own `name`")
    return errors


def _spec_rules(field: str, spec: EvaluatorConfig, root: Path, max_seq_len: int) -> List[str]:
    errors = []
    if spec.task is EvaluatorTask.perplexity:
        if not spec.data:
            errors.append(f"{field}.data is empty: name the text files, folders or prepared "
                          "dataset that task=perplexity scores")
        if spec.examples:
            errors.append(f"{field}.examples={spec.examples} is for choice and exact_match; "
                          "task=perplexity reads `data`")
    else:
        if not spec.examples:
            errors.append(f"{field}.examples is not set: name the JSONL file of examples that "
                          f"task={spec.task.value} reads")
        elif not _resolved(spec.examples, root).is_file():
            errors.append(f"{field}.examples={spec.examples}: no such file (looked for "
                          f"{_resolved(spec.examples, root)}; relative paths start at {root})")
        if spec.data:
            errors.append(f"{field}.data is for task=perplexity; task={spec.task.value} reads "
                          "`examples`")
    for name in ("limit", "seq_len"):
        if getattr(spec, name) < 0:
            errors.append(f"{field}.{name}={getattr(spec, name)} must be >= 0 (0: all)")
    if spec.seq_len > max_seq_len:
        errors.append(f"{field}.seq_len={spec.seq_len} exceeds model.max_seq_len={max_seq_len}: "
                      "lower it (0: the model's window)")
    for name in ("max_new_tokens", "batch_size"):
        if getattr(spec, name) <= 0:
            errors.append(f"{field}.{name}={getattr(spec, name)} must be positive")
    return errors


def _resolved(path: str, root: Path) -> Path:
    expanded = Path(path).expanduser()
    return expanded if expanded.is_absolute() else root / expanded
