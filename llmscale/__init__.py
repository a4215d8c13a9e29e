"""llmscale: pretrain large language models across GPU clusters."""

import warnings

__version__ = "0.1.0"

# megatron-core announces at import, on every rank and in every tool, that TransformerEngine and
# Apex are missing; llmscale uses neither (megatron's layers fall back to plain torch by design).
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
