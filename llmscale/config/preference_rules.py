"""The rules of preference optimisation (objective=dpo): its data folder, and the paths of the
loop it does not run on yet."""

import json
from pathlib import Path
from typing import List

from llmscale.config.load import REPO_ROOT
from llmscale.config.schema import LLMScaleConfig, Objective

PREPARE_PAIRS = ("python tools/prepare_sft.py --pairs --input PAIRS.jsonl --tokenizer TOKENIZER "
                 "--output {folder}")


def preference_rules(cfg: LLMScaleConfig) -> List[str]:
    data, errors = cfg.data, []
    if cfg.objective is not Objective.dpo:
        if data.pairs:
            errors.append(f"data.pairs={data.pairs} holds preference pairs, which objective=dpo "
                          f"trains, not objective={cfg.objective.value}: set objective=dpo, or "
                          "data.pairs=null")
        return errors
    if not data.pairs:
        errors.append("objective=dpo trains on preference pairs and data.pairs is not set: "
                      "add data=pairs data.pairs=FOLDER, a folder prepared with `"
                      + PREPARE_PAIRS.format(folder="FOLDER") + "`")
    else:
        errors += pairs_folder_rules(data.pairs)
    # data.chat with any objective but causal is refused with the chat rules.
    for name, value in (("data.blend", data.blend), ("data.paths", data.paths)):
        if value:
            errors.append(f"{name} is set with objective=dpo, which trains on data.pairs alone: "
                          f"set {name}=[] (data=pairs does)")
    return errors + unsupported_layout_rules(cfg)


def pairs_folder_rules(folder: str) -> List[str]:
    """The folder exists and its `dataset.json` (written last by the preparation) says it holds
    at least one pair; the data files themselves are opened by the run."""
    path = Path(folder).expanduser()
    path = path if path.is_absolute() else REPO_ROOT / path
    prepare = PREPARE_PAIRS.format(folder=folder)
    if not path.is_dir():
        return [f"data.pairs={folder}: there is no folder {path}; prepare it with `{prepare}`"]
    try:
        metadata = json.loads((path / "dataset.json").read_text())
    except (OSError, ValueError):
        return [f"data.pairs={folder}: {path} is not a prepared pairs folder (no readable "
                f"dataset.json); prepare it with `{prepare}`"]
    if metadata.get("kind") != "preference_pairs":
        return [f"data.pairs={folder}: {path} holds {metadata.get('kind', 'a dataset')}, not "
                f"preference pairs; prepare pairs with `{prepare}`"]
    if not metadata.get("documents"):
        return [f"data.pairs={folder}: {path} holds no pairs; prepare it again from a file "
                f"with usable pairs (`{prepare}`)"]
    return []


def unsupported_layout_rules(cfg: LLMScaleConfig) -> List[str]:
    errors = []
    if cfg.train.fused_loss:
        errors.append("objective=dpo with train.fused_loss=true: the fused loss returns a "
                      "batch's summed loss, and DPO needs each sequence's own; set "
                      "train.fused_loss=false")
    if cfg.model.num_experts:
        errors.append(f"objective=dpo with model.num_experts={cfg.model.num_experts}: the "
                      "routers' load-balancing loss is not added to the preference loss; use a "
                      "dense model")
    return errors
