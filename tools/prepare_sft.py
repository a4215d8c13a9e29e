"""Chat or instruction JSONL -> token ids and a loss mask for supervised fine-tuning; with
--pairs, preference pairs for DPO.

    python tools/prepare_sft.py --input data.jsonl [more.jsonl ...] --tokenizer TOKENIZER
        --output prepared/sft [--chat-template FILE] [--train-on-prompt] [--eod-token TOKEN]
    python tools/prepare_sft.py --pairs --input pairs.jsonl --tokenizer TOKENIZER
        --output prepared/dpo [--chat-template FILE] [--eod-token TOKEN]

Each line holds `messages` (system/user/assistant) or `prompt` and `response`. TOKENIZER is
"byte", a SentencePiece `.model` or a `tokenizer.json` (whose folder's chat template is used;
ChatML otherwise). Only assistant turns are trained on unless --train-on-prompt. Writes
OUTPUT/chat.bin/.idx, OUTPUT/chat_loss_mask.bin/.idx, dataset.json and report.json.

With --pairs each line holds `prompt`, `chosen` and `rejected` (strings, or message lists);
writes OUTPUT/chosen and OUTPUT/rejected (.bin/.idx and _loss_mask twins; pair i is document i
of each), the masks marking the response tokens. Pairs with equal or empty responses are
skipped and counted in report.json.
"""

import argparse
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("llmscale") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmscale.data.tokenizer import open_tokenizer  # noqa: E402
from llmscale.prep.chat import UnsupervisedExample, find_chat_template  # noqa: E402
from llmscale.prep.chat_dataset import write_chat_dataset  # noqa: E402
from llmscale.prep.preference_dataset import write_preference_dataset  # noqa: E402


def main(argv) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, type=Path, metavar="JSONL")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--chat-template", type=Path, help="a Jinja chat template file")
    parser.add_argument("--train-on-prompt", action="store_true",
                        help="train on every token, not only the assistant turns")
    parser.add_argument("--eod-token", help="the end-of-document token of a tokenizer.json")
    parser.add_argument("--pairs", action="store_true",
                        help="preference pairs (prompt, chosen, rejected) for DPO")
    args = parser.parse_args(argv)
    if args.pairs and args.train_on_prompt:
        parser.error("--train-on-prompt does not apply to --pairs: DPO compares the responses")
    missing = [str(path) for path in [*args.input, args.chat_template] if path and not path.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    try:
        tokenizer = open_tokenizer(args.tokenizer, args.eod_token)
        tokenizer_path = None if args.tokenizer == "byte" else Path(args.tokenizer)
        template = find_chat_template(tokenizer_path, args.chat_template)
        print(f"prepare_sft: chat template: {template.origin}")
        if args.pairs:
            report = write_preference_dataset(args.input, args.output, tokenizer, template)
        else:
            report = write_chat_dataset(args.input, args.output, tokenizer, template,
                                        args.train_on_prompt)
    except (UnsupervisedExample, ValueError, FileNotFoundError) as error:
        print(f"prepare_sft: error: {error}", file=sys.stderr)
        return 2
    print(f"prepare_sft: {report.describe()}; wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
