from llmscale.config.load import ConfigError, load_config, strip_launcher_args, to_yaml
from llmscale.config.schema import LLMScaleConfig
from llmscale.config.validate import ParallelPlan, validate

__all__ = [
    "ConfigError",
    "LLMScaleConfig",
    "ParallelPlan",
    "load_config",
    "strip_launcher_args",
    "to_yaml",
    "validate",
]
