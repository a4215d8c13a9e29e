"""llmscale: pretrain large language models across GPU clusters."""

__version__ = "0.1.0"
