"""Weights in and out: Hugging Face Llama folders, and llmscale's own weights folders.

llmscale's `Llama` uses `LlamaForCausalLM`'s parameter names, its RMSNorm, and its rotate_half
RoPE with q/k projections in HF's layout (tests/models/test_llama.py checks equal logits from
one state dict), so tensors map 1:1 with no renaming or permutation. What needs care is the
config mapping, the HF features llmscale lacks (refused by name), and the tied head, which HF
stores once, as `model.embed_tokens.weight`.

An llmscale weights folder (`model.safetensors` + `model.yaml`, the ModelConfig as a Hydra
model config) is what a run starts from for continued pretraining: `load_initial_weights`.
"""

import json
import math
import shutil
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors import safe_open
from safetensors.torch import save_file

from llmscale.config.schema import ModelConfig
from llmscale.models import Llama

# HF's default `max_shard_size="5GB"` (decimal gigabytes).
MAX_SHARD_BYTES = 5 * 10**9
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
MODEL_YAML = "model.yaml"
HEAD, EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"
# Files of an HF tokenizer, carried along when a folder is converted.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja", "generation_config.json")

# What each axis of a weight measures, to name the setting behind a shape mismatch.
_AXES = {
    "embed_tokens": ("vocab_size", "hidden_size"),
    "lm_head": ("vocab_size", "hidden_size"),
    "q_proj": ("num_attention_heads x head_dim", "hidden_size"),
    "k_proj": ("num_key_value_heads", "hidden_size"),
    "v_proj": ("num_key_value_heads", "hidden_size"),
    "o_proj": ("hidden_size", "num_attention_heads x head_dim"),
    "gate_proj": ("intermediate_size", "hidden_size"),
    "up_proj": ("intermediate_size", "hidden_size"),
    "down_proj": ("hidden_size", "intermediate_size"),
    "norm": ("hidden_size",),
}
# ModelConfig fields that change what the weights compute: a run must match them to start
# from the weights. (max_seq_len may grow or shrink; init_std and name do not matter.)
_MATH_FIELDS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                "vocab_size", "tie_embeddings", "rope_theta", "norm_eps", "causal")


# ---- Hugging Face folders ------------------------------------------------------------------

def hf_config(cfg: ModelConfig, dtype: torch.dtype, bos_token_id: Optional[int] = None,
              eos_token_id: Optional[int] = None) -> dict:
    """config.json for `LlamaForCausalLM`, in the transformers 4 layout that 5 still reads."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads or cfg.num_heads,
        "num_hidden_layers": cfg.num_layers,
        "head_dim": cfg.hidden_size // cfg.num_heads,
        "vocab_size": cfg.vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "torch_dtype": str(dtype).removeprefix("torch."),
        # Written even when unknown: transformers would otherwise assume Llama-2's 1 and 2.
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
    }


def model_config_from_hf(config: dict, name: str = "hf") -> ModelConfig:
    """The ModelConfig of an HF Llama config.json; a feature llmscale's model lacks is refused
    by its field name rather than silently computing something else."""
    model_type = config.get("model_type")
    if model_type != "llama":
        raise ValueError(f"config.json model_type={model_type!r}: only 'llama' models convert")
    _refuse_unless(config, "hidden_act", "silu", default="silu")
    _refuse_unless(config, "attention_bias", False, default=False)
    _refuse_unless(config, "mlp_bias", False, default=False)
    rope = _rope_settings(config)
    try:
        hidden_size, num_heads = config["hidden_size"], config["num_attention_heads"]
        cfg = ModelConfig(
            name=name,
            hidden_size=hidden_size,
            num_layers=config["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            intermediate_size=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            max_seq_len=config.get("max_position_embeddings", 2048),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            # LlamaConfig's defaults, for the keys a config.json may leave out.
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            init_std=float(config.get("initializer_range", 0.02)),
        )
    except KeyError as missing:
        raise ValueError(f"config.json lacks {missing.args[0]!r}") from None
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim != hidden_size // num_heads:
        raise ValueError(
            f"config.json head_dim={head_dim} differs from hidden_size / num_attention_heads = "
            f"{hidden_size // num_heads}: llmscale's attention derives head_dim, so it cannot "
            "load this model"
        )
    return cfg


def export_hf(state_dict: Dict[str, torch.Tensor], model_cfg: ModelConfig, out_dir: Path,
              tokenizer_files: Iterable[Path] = (), max_shard_bytes: int = MAX_SHARD_BYTES,
              dtype: Optional[torch.dtype] = None, bos_token_id: Optional[int] = None,
              eos_token_id: Optional[int] = None) -> Path:
    """Write an HF Llama folder that `LlamaForCausalLM.from_pretrained` loads; tensors keep
    their dtype unless `dtype` is given."""
    if model_cfg.num_experts:
        raise ValueError(
            f"model {model_cfg.name} is a mixture of experts (model.num_experts="
            f"{model_cfg.num_experts}): export to Hugging Face covers dense Llama models only"
        )
    if not model_cfg.causal:
        raise ValueError(
            f"model {model_cfg.name} is a bidirectional encoder (model.causal=false, trained "
            "with objective=mlm): a Hugging Face LlamaForCausalLM would run it causally and "
            "compute something else; its llmscale checkpoint is what resumes and evaluates it"
        )
    check_weights(state_dict, model_cfg, "the state dict")
    tensors = _without_tied_head(state_dict, model_cfg)
    if dtype is not None:
        tensors = {name: tensor.to(dtype) for name, tensor in tensors.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, out_dir, max_shard_bytes)
    config = hf_config(model_cfg, next(iter(tensors.values())).dtype, bos_token_id, eos_token_id)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _copy_files(tokenizer_files, out_dir)
    return out_dir


def import_hf(hf_dir: Path) -> Tuple[Dict[str, torch.Tensor], ModelConfig]:
    """The weights (dtype as stored) and ModelConfig of an HF Llama folder."""
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{hf_dir} is not a Hugging Face model folder: it has no config.json"
        )
    cfg = model_config_from_hf(json.loads(config_path.read_text()), name=hf_dir.name)
    state_dict = read_safetensors(hf_dir)
    if cfg.tie_embeddings and EMBEDDING in state_dict:
        # HF ties by config: a stored head, if any, is ignored in favour of the embedding.
        state_dict[HEAD] = state_dict[EMBEDDING]
    check_weights(state_dict, cfg, str(hf_dir))
    return state_dict, cfg


def tokenizer_files_in(folder: Path) -> List[Path]:
    """The HF tokenizer files a folder has, to carry into a converted copy."""
    return [Path(folder) / name for name in TOKENIZER_FILES if (Path(folder) / name).is_file()]


# ---- llmscale weights folders --------------------------------------------------------------

def save_weights(state_dict: Dict[str, torch.Tensor], model_cfg: ModelConfig, out_dir: Path,
                 tokenizer_files: Iterable[Path] = (),
                 max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    check_weights(state_dict, model_cfg, "the state dict")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_safetensors(_without_tied_head(state_dict, model_cfg), out_dir, max_shard_bytes)
    (out_dir / MODEL_YAML).write_text(OmegaConf.to_yaml(OmegaConf.structured(model_cfg)))
    _copy_files(tokenizer_files, out_dir)
    return out_dir


def load_weights(weights_dir: Path) -> Tuple[Dict[str, torch.Tensor], ModelConfig]:
    weights_dir = Path(weights_dir)
    yaml_path = weights_dir / MODEL_YAML
    if not yaml_path.is_file():
        raise FileNotFoundError(
            f"{weights_dir} is not an llmscale weights folder: it has no {MODEL_YAML} (make one "
            "with `python tools/convert_checkpoint.py from-hf HF_DIR OUT`)"
        )
    try:
        cfg = OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(yaml_path))
        )
    except OmegaConfBaseException as error:
        raise ValueError(f"{yaml_path} is not a model config: {error}") from None
    state_dict = read_safetensors(weights_dir)
    if cfg.tie_embeddings and EMBEDDING in state_dict:
        state_dict[HEAD] = state_dict[EMBEDDING]
    return state_dict, cfg


@torch.no_grad()
def load_initial_weights(model: Llama, weights_dir: Path) -> None:
    """Start `model` from a weights folder, strictly (`initial_weights`). Call it on the built
    model before DeepSpeed wraps it (ZeRO-3 then partitions what was loaded)."""
    model.load_state_dict(initial_weights(model.cfg, weights_dir), strict=True)


def initial_weights(cfg: ModelConfig, weights_dir: Path) -> Dict[str, torch.Tensor]:
    """A weights folder's state dict for a model of `cfg`, which must match the config the
    weights were trained with, and every parameter's name and shape."""
    state_dict, saved = load_weights(weights_dir)
    differences = [
        f"model.{name}={getattr(cfg, name)!r} but the weights have {getattr(saved, name)!r}"
        for name in _MATH_FIELDS
        if not _same_setting(_effective(cfg, name), _effective(saved, name))
    ]
    if differences:
        raise ValueError(
            f"the model does not match the weights in {weights_dir}: " + "; ".join(differences)
            + f". Use the weights' own settings ({Path(weights_dir) / MODEL_YAML})"
        )
    check_weights(state_dict, cfg, str(weights_dir))
    return state_dict


# ---- safetensors files and strict checks ---------------------------------------------------

def write_safetensors(tensors: Dict[str, torch.Tensor], out_dir: Path,
                      max_shard_bytes: int) -> None:
    """One `model.safetensors`, or numbered shards of at most `max_shard_bytes` each (a larger
    tensor gets a shard of its own) plus HF's index of which shard holds which tensor."""
    shards = _plan_shards(tensors, max_shard_bytes)
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        save_file(_owned(tensors), out_dir / SAFETENSORS_FILE, metadata=metadata)
        return
    weight_map = {}
    for number, names in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(_owned({name: tensors[name] for name in names}), out_dir / file_name,
                  metadata=metadata)
        weight_map.update((name, file_name) for name in names)
    total = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def read_safetensors(folder: Path) -> Dict[str, torch.Tensor]:
    """The tensors of `model.safetensors`, or of the shards its index names."""
    folder = Path(folder)
    index_path = folder / SAFETENSORS_INDEX
    if index_path.is_file():
        files = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
    elif (folder / SAFETENSORS_FILE).is_file():
        files = [SAFETENSORS_FILE]
    else:
        legacy = [p.name for p in folder.glob("*.bin")]
        hint = (f" (it has {', '.join(legacy)}: pickled weights are not read; re-save them with "
                "save_pretrained(safe_serialization=True))") if legacy else ""
        raise FileNotFoundError(
            f"{folder} has neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX}{hint}"
        )
    tensors = {}
    for file_name in files:
        with safe_open(folder / file_name, framework="pt") as shard:
            tensors.update((name, shard.get_tensor(name)) for name in shard.keys())
    return tensors


def check_weights(state_dict: Dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> None:
    """Names and shapes exactly those of `Llama(cfg)`, or a ValueError that names each
    offending parameter, both shapes and the setting that most likely differs."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in Llama(cfg).state_dict().items()}
    actual = {name: tuple(t.shape) for name, t in state_dict.items()}
    problems = [
        f"{name}: {source} has shape {actual[name]}, the model expects {expected[name]} "
        f"(likely cause: {_likely_cause(name, actual[name], expected[name])})"
        for name in expected if name in actual and actual[name] != expected[name]
    ]
    missing = [name for name in expected if name not in actual]
    unexpected = [name for name in actual if name not in expected]
    if missing:
        problems.append(f"{source} lacks {_some(missing)}{_count_hint(missing, unexpected, cfg)}")
    if unexpected:
        problems.append(f"{source} has parameters the model lacks: {_some(unexpected)}"
                        f"{_count_hint(unexpected, missing, cfg)}")
    if problems:
        raise ValueError("weights do not fit the model:\n  " + "\n  ".join(problems))


def _likely_cause(name: str, actual: tuple, expected: tuple) -> str:
    if len(actual) != len(expected):
        return "a different kind of tensor under the same name"
    module = name.split(".")[-2]
    axes = _AXES.get("norm" if module.endswith("norm") else module)
    if axes is None:
        return "a model setting differs"
    differing = [axes[i] for i in range(len(axes)) if actual[i] != expected[i]]
    return " and ".join(dict.fromkeys(differing)) + " differs"


def _count_hint(names: Sequence[str], others: Sequence[str], cfg: ModelConfig) -> str:
    if any(".layers." in name for name in names):
        return f" (num_layers differs: the model has {cfg.num_layers} layers)"
    if HEAD in names and not others:
        return " (tie_embeddings differs: one side shares the embedding as the output head)"
    return ""


def _some(names: List[str], limit: int = 6) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _refuse_unless(config: dict, key: str, supported, default) -> None:
    value = config.get(key, default)
    if value != supported:
        raise ValueError(f"config.json {key}={value!r} is not supported by llmscale's Llama "
                         f"(it implements {key}={supported!r})")


def _rope_settings(config: dict) -> dict:
    """RoPE settings from either layout: transformers 4's `rope_theta` + `rope_scaling`, or
    5's `rope_parameters`. Only plain RoPE is implemented."""
    rope = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling")
    for key, settings in (("rope_parameters", rope), ("rope_scaling", scaling or {})):
        kind = settings.get("rope_type", settings.get("type", "default"))
        if kind != "default":
            raise ValueError(f"config.json {key} uses rope_type={kind!r}: llmscale implements "
                             "plain RoPE only (rope_type 'default', no scaling)")
    if "rope_theta" in config:
        rope.setdefault("rope_theta", config["rope_theta"])
    return rope


def _same_setting(a, b) -> bool:
    """Floats compare to float32 precision: GGUF and some config.json files store eps that way
    (1e-5 comes back as 9.99999975e-06)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6)
    return a == b


def _effective(cfg: ModelConfig, name: str):
    """A setting as the model uses it: num_kv_heads=None means as many as num_heads."""
    value = getattr(cfg, name)
    if name == "num_kv_heads":
        return value or cfg.num_heads
    return float(value) if name in ("rope_theta", "norm_eps") else value


def _without_tied_head(state_dict: Dict[str, torch.Tensor], cfg: ModelConfig):
    """A tied head is stored once, as the embedding (HF's layout)."""
    if not cfg.tie_embeddings:
        return dict(state_dict)
    head, embedding = state_dict[HEAD], state_dict[EMBEDDING]
    if head is not embedding and not torch.equal(head, embedding):
        raise ValueError(f"tie_embeddings is true but {HEAD} differs from {EMBEDDING}: these "
                         "weights were trained untied; set tie_embeddings=false")
    return {name: tensor for name, tensor in state_dict.items() if name != HEAD}


def _owned(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (views of one buffer): copy those only."""
    seen = set()
    result = {}
    for name, tensor in tensors.items():
        storage = tensor.untyped_storage().data_ptr()
        whole = tensor.is_contiguous() and tensor.untyped_storage().nbytes() == (
            tensor.numel() * tensor.element_size())
        result[name] = tensor if whole and storage not in seen else tensor.clone()
        seen.add(storage)
    return result


def _plan_shards(tensors: Dict[str, torch.Tensor], max_shard_bytes: int) -> List[List[str]]:
    shards: List[List[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _copy_files(files: Iterable[Path], out_dir: Path) -> None:
    for path in map(Path, files):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file to copy")
        shutil.copy2(path, out_dir / path.name)

