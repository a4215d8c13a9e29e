"""Evaluate a model: held-out perplexity, multiple choice by likelihood, exact match of greedy
answers. The model is a run folder (its newest complete checkpoint; a LoRA run with its adapters
merged), a checkpoint step folder, an llmscale weights folder or a Hugging Face Llama folder.

    python tools/evaluate.py perplexity runs/tiny --data data/shakespeare/tempest.txt
    python tools/evaluate.py choice runs/tiny --examples data/eval/next_line.jsonl --delimiter ''
    python tools/evaluate.py exact-match hf/smollm2-135m --examples quiz/heldout.jsonl --limit 8

Examples are split over the ranks of `torchrun --nproc_per_node N tools/evaluate.py ...` and the
results gathered: any N gives the same results as one process. Rank 0 prints a summary and
writes the results to --output as JSON, and with --log-to-run RUN_DIR appends the metrics to
the run's metrics.jsonl as eval/NAME/METRIC, the names `train.evaluators` log under:

    python tools/evaluate.py choice runs/tiny --examples data/eval/next_line.jsonl \
        --log-to-run runs/tiny
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional

import torch

from llmscale.user_errors import exit_code_of

if TYPE_CHECKING:
    from llmscale.config.schema import EvaluatorConfig
    from llmscale.eval.ranks import Ranks

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: Optional[list]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[1:]))
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("model", type=Path, help="a run, step, llmscale weights or HF folder")
    common.add_argument("--tokenizer", default=None,
                        help="'byte', a SentencePiece .model or a tokenizer.json (default: the "
                             "one beside the weights, or the run's)")
    common.add_argument("--output", type=Path, default=None, help="write the results as JSON")
    common.add_argument("--device", default="auto", help="'cpu', 'cuda' (default: a GPU if any)")
    common.add_argument("--dtype", choices=DTYPES, default="float32")
    common.add_argument("--name", default=None,
                        help="the results' name, eval/NAME/METRIC in a run's metrics (default: "
                             "the stem of the examples or first data file)")
    common.add_argument("--log-to-run", type=Path, default=None, metavar="RUN_DIR",
                        help="also append the metrics to that run's metrics.jsonl (and "
                             "TensorBoard and W&B where its config logs there)")
    common.add_argument("--step", type=int, default=None,
                        help="the step to log them at (default: the evaluated checkpoint's)")
    tasks = parser.add_subparsers(dest="task", required=True)
    perplexity = tasks.add_parser("perplexity", parents=[common],
                                  help="held-out loss and perplexity")
    perplexity.add_argument("--data", nargs="+", required=True,
                            help="text files, folders or globs, or a prepared dataset folder")
    perplexity.add_argument("--seq-len", type=int, default=0,
                            help="tokens per window (default: the model's max_seq_len)")
    perplexity.add_argument("--batch-size", type=int, default=4)
    perplexity.add_argument("--max-windows", type=int, default=0, help="0: every window")
    choice = tasks.add_parser("choice", parents=[common],
                              help="multiple choice by log-likelihood (acc, acc_norm)")
    choice.add_argument("--examples", type=Path, required=True,
                        help='JSONL of {"context", "choices", "label"}')
    choice.add_argument("--delimiter", default=" ",
                        help="text between context and each choice (default: one space)")
    choice.add_argument("--limit", type=int, default=0, help="the first N examples (0: all)")
    exact = tasks.add_parser("exact-match", parents=[common],
                             help="greedy answers compared with the expected ones")
    exact.add_argument("--examples", type=Path, required=True,
                       help='JSONL of {"prompt", "answer"}')
    exact.add_argument("--max-new-tokens", type=int, default=32)
    exact.add_argument("--no-chat-template", action="store_true",
                       help="give prompts as they are, even to a tokenizer with a chat template")
    exact.add_argument("--contains", action="store_true",
                       help="also count an answer found within the generation")
    exact.add_argument("--first-line", action="store_true",
                       help="compare only the first non-empty line of each generation")
    exact.add_argument("--limit", type=int, default=0, help="the first N examples (0: all)")
    args = parser.parse_args(argv)
    if args.step is not None and args.log_to_run is None:
        parser.error("--step is the step --log-to-run logs at: give --log-to-run RUN_DIR too")
    return args


def run(args: argparse.Namespace) -> Dict:
    from llmscale.eval.ranks import evaluation_ranks

    with evaluation_ranks(args.device) as ranks:
        return _evaluate(args, ranks)


def _evaluate(args: argparse.Namespace, ranks: "Ranks") -> Dict:
    from llmscale.eval.model_source import load_model
    from llmscale.eval.tasks import prepare_task, run_task

    if args.log_to_run:  # before the evaluation, which may take long
        from llmscale.eval.run_log import check_run

        check_run(args.log_to_run)
    started = time.perf_counter()
    loaded = load_model(args.model, args.tokenizer, ranks.device, DTYPES[args.dtype])
    loaded_at = time.perf_counter()
    task = prepare_task(evaluator_of(args), loaded.tokenizer, Path.cwd(), "--data")
    results = run_task(task, loaded, ranks)
    timing = results.pop("timing", {})
    timing.update(load_seconds=round(loaded_at - started, 3),
                  eval_seconds=round(time.perf_counter() - loaded_at, 3),
                  world_size=ranks.world_size)
    report = {"task": args.task, "name": task.name, "model": str(loaded.origin),
              "data": task.source, **results, "timing": timing}
    if ranks.is_main:
        if args.output:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(report, indent=2) + "\n")
        print(summary(report))
        if args.log_to_run:
            from llmscale.eval.run_log import log_to_run

            step = log_to_run(args.log_to_run, args.step, loaded.origin, task.name,
                              report["metrics"])
            print(f"logged to {args.log_to_run} at step {step} as eval/{task.name}/...")
    return report


def evaluator_of(args: argparse.Namespace) -> "EvaluatorConfig":
    """The command line's task as the `train.evaluators` entry that runs the same."""
    from llmscale.config.schema import EvaluatorConfig, EvaluatorTask

    task = EvaluatorTask(args.task.replace("-", "_"))
    if task is EvaluatorTask.perplexity:
        return EvaluatorConfig(task, args.name, data=list(args.data), limit=args.max_windows,
                               seq_len=args.seq_len, batch_size=args.batch_size)
    if task is EvaluatorTask.choice:
        return EvaluatorConfig(task, args.name, str(args.examples), limit=args.limit,
                               delimiter=args.delimiter)
    return EvaluatorConfig(task, args.name, str(args.examples), limit=args.limit,
                           max_new_tokens=args.max_new_tokens,
                           chat_template=not args.no_chat_template, contains=args.contains,
                           first_line=args.first_line)


def summary(report: Dict) -> str:
    metrics = ", ".join(f"{name} {value:.4f}" if isinstance(value, float) else f"{name} {value}"
                        for name, value in report["metrics"].items())
    timing = report["timing"]
    return (f"{report['task']} of {report['model']} on {report['data']}: {metrics} "
            f"(loaded in {timing['load_seconds']:.1f} s, evaluated in "
            f"{timing['eval_seconds']:.1f} s on {timing['world_size']} rank(s))")


def main(argv: Optional[list] = None) -> int:
    args = parse_args(argv)
    return exit_code_of(lambda: run(args), (ValueError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
