"""Compose the Hydra config from `conf/` and the command line into a typed `LLMScaleConfig`.

The compose API is used instead of `@hydra.main` so every rank of a distributed launch reads
the same config without each one creating (and racing on) a Hydra output folder, and so
composition errors reach the user as one clear line instead of a traceback.
"""

import dataclasses
import difflib
import itertools
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llmscale.config.schema import LLMScaleConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"


class ConfigError(ValueError):
    """A setting that cannot work; the message names the field, the value and the fix."""


ConfigStore.instance().store(name="llmscale_schema", node=LLMScaleConfig)


def strip_launcher_args(argv: Sequence[str]) -> List[str]:
    """Drop `--local_rank=N` / `--local_rank N`, which the DeepSpeed launcher appends and
    Hydra's override grammar rejects; the rank is read from the LOCAL_RANK variable instead."""
    kept: List[str] = []
    skip_next = False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg in ("--local_rank", "--local-rank"):
            skip_next = True
        elif not arg.startswith(("--local_rank=", "--local-rank=")):
            kept.append(arg)
    return kept


def load_config(overrides: Sequence[str]) -> LLMScaleConfig:
    for override in overrides:
        if override.startswith("-"):
            raise ConfigError(
                f"unknown option {override!r}: llmscale takes Hydra overrides such as "
                "`+exp=tiny train.max_steps=50`, not dashed flags (--help lists the options)"
            )
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            composed = compose(config_name="config", overrides=list(overrides))
        unknown = _unknown_keys(OmegaConf.to_container(composed), LLMScaleConfig)
        if unknown:
            raise ConfigError("\n".join(unknown))
        return OmegaConf.to_object(composed)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(_one_message(error)) from None


def to_yaml(cfg: LLMScaleConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_groups() -> Dict[str, Tuple[List[str], Optional[str]]]:
    """Each config group of `conf/`: its options and the one the root config picks (None for
    `exp`, picked with `+exp=NAME`)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        choices = compose(config_name="config", return_hydra_config=True).hydra.runtime.choices
        return {group: (loader.get_group_options(group), choices.get(group))
                for group in loader.list_groups("") if group != "hydra"}


def expand_sweep(overrides: Sequence[str]) -> List[List[str]]:
    """Every combination of the overrides' swept values (`a,b`, `range(...)`, `glob(...)`,
    `choice(...)`), in the order of Hydra's basic sweeper; overrides that sweep nothing are kept
    as written."""
    choices: Dict[str, List[str]] = {}
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            loader = GlobalHydra.instance().config_loader()
            for override in OverridesParser.create().parse_overrides(list(overrides)):
                key = override.get_key_element()
                if not override.is_sweep_override():
                    choices[key] = [override.input_line]
                elif not override.is_discrete_sweep():
                    raise ConfigError(f"{override.input_line}: an interval has no values to run "
                                      "one by one; list them (a,b,c) or use range(start,stop,step)")
                else:
                    override.config_loader = loader  # glob() lists a group's options
                    choices[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
    except HydraException as error:
        raise ConfigError(_one_message(error)) from None
    return [list(combination) for combination in itertools.product(*choices.values())]


def _unknown_keys(values: Dict[str, Any], schema: type, prefix: str = "") -> List[str]:
    """Keys that a `+key=value` override added outside the schema: `to_object` would drop them
    without a word, so a typo such as `+train.max_step=5` would be ignored."""
    fields = {field.name: field.type for field in dataclasses.fields(schema)}
    problems: List[str] = []
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"did you mean {prefix}{close[0]}? " if close else ""
            problems.append(
                f"unknown key {prefix}{key}: {schema.__name__} has no such setting; {hint}"
                "`+` only adds keys under parallel.deepspeed_extra"
            )
        elif dataclasses.is_dataclass(fields[key]) and isinstance(value, dict):
            problems += _unknown_keys(value, fields[key], f"{prefix}{key}.")
    return problems


# OmegaConf's wording for a key that a schema dataclass lacks (a free-form dict says "is not in
# struct"); Hydra then suggests `+key=value`, which cannot add a setting to the schema.
_NOT_IN_SCHEMA = re.compile(r"^Key '.*' not in '\w+'$")


def _one_message(error: BaseException) -> str:
    """Hydra wraps OmegaConf's error, which carries the full key path: keep both, minus
    OmegaConf's unfilled message templates and Hydra's `+` hint where it cannot work."""
    lines = str(error).strip().splitlines()
    cause = error.__cause__
    if cause is not None and str(cause).strip() not in "\n".join(lines):
        lines += str(cause).strip().splitlines()
    not_in_schema = any(_NOT_IN_SCHEMA.match(line) for line in lines)
    return "\n".join(
        line for line in lines
        if "$VALUE" not in line
        and not (not_in_schema and line.startswith("To append to your config use"))
    )
