from llmscale.config.load import ConfigError, load_config, strip_launcher_args, to_yaml
from llmscale.config.plan import ParallelPlan
from llmscale.config.schema import LLMScaleConfig
from llmscale.config.validate import validate

__all__ = [
    "ConfigError",
    "LLMScaleConfig",
    "ParallelPlan",
    "load_config",
    "strip_launcher_args",
    "to_yaml",
    "validate",
]
