"""megatron-core's tensor-parallel layers on a machine without CUDA.

megatron-core 0.16 assumes a GPU in two places that the layers llmscale uses reach: the
sequence-parallel all-gather and reduce-scatter allocate their buffers on
`torch.cuda.current_device()`, and weight initialisation forks the CUDA RNG tracker. llmscale
never lets Megatron initialise weights (they are copied from a full model, see
`llmscale.parallel.tensor_parallel`), so only the first needs mending: on a machine without
CUDA, `torch.cuda.current_device()` names the CPU. Everything else runs as shipped on gloo.
"""

import torch


def allow_megatron_layers_on_cpu() -> None:
    """Called once at start-up, before any tensor-parallel layer runs; a no-op with CUDA."""
    if torch.cuda.is_available():
        return
    torch.cuda.current_device = _cpu_device


def _cpu_device() -> str:
    return "cpu"
