"""The pretraining command line: Hydra overrides beside `--help`, `--cfg job` and `-m`."""

import pytest

from llmscale.config import ConfigError
from llmscale.config.load import REPO_ROOT
from llmscale.config.command_line import help_text, parse_command_line


def test_options_are_told_apart_from_overrides() -> None:
    command = parse_command_line(["+exp=tiny", "--local_rank=1", "-m", "optim.lr=1e-3,3e-3",
                                  "--cfg", "job"], world_size=1)
    assert command.overrides == ["+exp=tiny", "optim.lr=1e-3,3e-3"]
    assert command.multirun and command.print_config and not command.show_help
    for spelling in (["--cfg=job"], ["-c", "job"]):
        assert parse_command_line(spelling, world_size=1).print_config
    assert parse_command_line(["--multirun"], world_size=1).multirun
    assert parse_command_line(["-h"], world_size=1).show_help
    # Dashed words that are not options stay for load_config to refuse, naming them.
    assert parse_command_line(["--max_steps", "5"], world_size=1).overrides == ["--max_steps", "5"]


@pytest.mark.parametrize("argv", [["--cfg", "hydra"], ["--cfg"], ["--cfg=all"]])
def test_cfg_shows_only_the_job_config(argv) -> None:
    with pytest.raises(ConfigError, match="--cfg takes `job`"):
        parse_command_line(argv, world_size=1)


def test_a_sweep_under_a_launcher_of_several_ranks_points_at_the_slurm_array() -> None:
    with pytest.raises(ConfigError) as error:
        parse_command_line(["-m", "optim.lr=1e-3,3e-3"], world_size=2)
    message = str(error.value)
    assert "started 2 ranks" in message
    assert "launch/slurm/sweep.sbatch" in message and "python -m llmscale.config.sweep" in message


def test_help_lists_groups_with_their_defaults_experiments_and_examples() -> None:
    text = help_text()
    assert ("  model       125m, 13b, 1_3b, 1b, 70b, 7b, mixtral_8x7b, moe_tiny, smollm2_135m, "
            "tiny*\n" in text)
    assert "  tokenizer   byte*, huggingface, sentencepiece\n" in text
    experiments = sorted(path.stem for path in (REPO_ROOT / "conf" / "exp").glob("*.yaml"))
    assert {"125m", "tiny", "continued_smollm2"} <= set(experiments)
    assert f"Experiments (+exp=NAME): {', '.join(experiments)}\n" in text
    for option in ("--help", "--cfg job", "-m, --multirun"):
        assert option in text
    assert "python launch/pretrain.py +exp=tiny -m optim.lr=1e-3,3e-3" in text
    assert "hydra" not in text.split("Config groups")[1].split("Examples")[0]
