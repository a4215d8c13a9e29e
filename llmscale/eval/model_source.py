"""The model to evaluate and its tokenizer, from whichever folder holds them: a training run (its
newest complete checkpoint), one checkpoint step folder, an llmscale weights folder
(`model.yaml`), or a Hugging Face Llama folder (`config.json`). A LoRA run's adapters are folded
into its base weights (a QLoRA run's into its base as NF4 rounded it), so the model evaluated is
the one it trained."""

import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Dict, Optional, Set, Tuple

import torch

from llmscale.checkpoint.hf import MODEL_YAML, import_hf, load_weights
from llmscale.config.load import REPO_ROOT
from llmscale.config.schema import (
    AdapterConfig, AdapterKind, DataConfig, ModelConfig, TokenizerConfig,
)
from llmscale.data import Tokenizer, build_tokenizer, document_position_ids, open_tokenizer
from llmscale.models import Llama
from llmscale.prep.chat import CHATML, ChatTemplate, find_chat_template

HF_TOKENIZER = "tokenizer.json"


@dataclass
class LoadedModel:
    model: Llama
    tokenizer: Tokenizer
    # What was loaded, for reports: the step folder of a run, else the folder given.
    origin: Path
    # The tokenizer's own chat template (None: it has none).
    chat_template: Optional[ChatTemplate] = None
    # Ids that end a generation: the tokenizer's end of document and the model's EOS ids.
    stop_ids: Set[int] = field(default_factory=set)


def load_model(path: Path, tokenizer: Optional[str] = None,
               device: torch.device = torch.device("cpu"),
               dtype: torch.dtype = torch.float32) -> LoadedModel:
    """`tokenizer` ("byte", a `.model` or a `tokenizer.json`) overrides the one found beside
    the weights or in the run's config."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such model folder (give a run folder, a checkpoint step folder, an "
            f"llmscale weights folder with {MODEL_YAML} or a Hugging Face folder with config.json)")
    if (path / "config.json").is_file():
        state_dict, cfg = import_hf(path)
        found, origin, data = _tokenizer_beside(path), path, DataConfig()
    elif (path / MODEL_YAML).is_file():
        state_dict, cfg = load_weights(path)
        found, origin, data = _tokenizer_beside(path), path, DataConfig()
    else:
        state_dict, cfg, found, origin, data = _from_checkpoint(path)
    if not cfg.causal:
        raise ValueError(f"{path} holds a bidirectional encoder (model.causal=false, trained "
                         "as a masked LM): likelihoods and generation need a causal model")
    tokenizer_path = found.path if tokenizer is None else (
        None if tokenizer == "byte" else Path(tokenizer))
    chosen = open_tokenizer(tokenizer) if tokenizer else found.tokenizer
    if chosen is None:
        raise ValueError(f"{path} holds no {HF_TOKENIZER}: name the model's tokenizer with "
                         "--tokenizer (a tokenizer.json, a SentencePiece .model, or 'byte')")
    if chosen.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {chosen.vocab_size} tokens but the model only "
                         f"{cfg.vocab_size}: it is not this model's tokenizer")
    model = _built(cfg, state_dict, device, dtype)
    if data.document_attention:  # as the run trained: packed documents kept apart
        model.use_document_attention(partial(document_position_ids, eod_id=chosen.eod_id))
    return with_tokenizer(model, chosen, tokenizer_path, origin)


def with_tokenizer(model: Llama, tokenizer: Tokenizer, tokenizer_path: Optional[Path],
                   origin: Path) -> LoadedModel:
    """`model` (loaded, or live in a training run) with its tokenizer, the chat template
    shipped beside the tokenizer and the ids that end a generation."""
    return LoadedModel(model, tokenizer, origin, _own_chat_template(tokenizer_path),
                       stop_ids(origin, tokenizer_path, tokenizer.eod_id))


@dataclass
class _FoundTokenizer:
    tokenizer: Optional[Tokenizer]
    path: Optional[Path]


def _tokenizer_beside(folder: Path) -> _FoundTokenizer:
    path = folder / HF_TOKENIZER
    return _FoundTokenizer(open_tokenizer(str(path)), path) if path.is_file() else \
        _FoundTokenizer(None, None)


def _from_checkpoint(path: Path) -> Tuple[Dict[str, torch.Tensor], ModelConfig, _FoundTokenizer,
                                          Path, DataConfig]:
    # Imported here: consolidation loads DeepSpeed, which HF and weights folders do not need.
    from llmscale.checkpoint.cli import resolve_checkpoint
    from llmscale.checkpoint.consolidate import (
        consolidated_state_dict, model_config_of, nf4_rounded_base, saved_settings,
    )
    from llmscale.checkpoint.peft_export import merged, without_adapters

    step_dir = resolve_checkpoint(path)
    state_dict = consolidated_state_dict(step_dir)
    if saved_settings(step_dir, "adapter", AdapterConfig,
                      required=False).kind is AdapterKind.qlora:  # it holds the adapters alone
        state_dict = {**nf4_rounded_base(step_dir), **state_dict}
    if len(without_adapters(state_dict)) < len(state_dict):
        state_dict = merged(state_dict, step_dir)
    tokenizer_cfg = saved_settings(step_dir, "tokenizer", TokenizerConfig, required=False)
    # A run's relative tokenizer path is relative to the checkout it was launched from.
    tokenizer = build_tokenizer(tokenizer_cfg, REPO_ROOT)
    tokenizer_path = getattr(tokenizer, "path", None)
    data = saved_settings(step_dir, "data", DataConfig, required=False)
    return (state_dict, model_config_of(step_dir), _FoundTokenizer(tokenizer, tokenizer_path),
            step_dir, data)


def _built(cfg: ModelConfig, state_dict: Dict[str, torch.Tensor], device: torch.device,
           dtype: torch.dtype) -> Llama:
    model = Llama(cfg)
    model.load_state_dict(state_dict, strict=True)
    return model.to(device=device, dtype=dtype).eval()


def _own_chat_template(tokenizer_path: Optional[Path]) -> Optional[ChatTemplate]:
    """The template shipped beside a tokenizer.json; ChatML is not assumed for a model that
    never saw it."""
    if tokenizer_path is None or tokenizer_path.suffix != ".json":
        return None
    template = find_chat_template(tokenizer_path, None)
    return None if template.source == CHATML and "default" in template.origin else template


def stop_ids(model_path: Path, tokenizer_path: Optional[Path], eod_id: int) -> Set[int]:
    """End of document, and the eos ids of the model's folder and of its tokenizer's: a run
    folder has no generation config, and the one beside its tokenizer names the chat model's
    end-of-turn token."""
    folders = {model_path, *([tokenizer_path.parent] if tokenizer_path else [])}
    return {eod_id, *(token for folder in folders for token in _eos_ids(folder))}


def _eos_ids(folder: Path) -> Set[int]:
    """The eos_token_id of an HF folder's generation_config.json and config.json (one id or a
    list: chat models end a turn with their own token)."""
    ids: Set[int] = set()
    for name in ("generation_config.json", "config.json"):
        file = folder / name
        if file.is_file():
            value = json.loads(file.read_text()).get("eos_token_id")
            ids.update(value if isinstance(value, list) else [] if value is None else [value])
    return ids
