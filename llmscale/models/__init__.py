from llmscale.models.flops import count_parameters, flops_per_token
from llmscale.models.llama import Llama

__all__ = ["Llama", "count_parameters", "flops_per_token"]
