"""The console commands pyproject.toml installs, and the tools/ scripts that run the same code from
a checkout."""

import ast
import importlib
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

REPO_ROOT = Path(__file__).resolve().parents[1]
# command -> (entry point, the tools/ script that wraps it)
COMMANDS = {
    "llmscale-preprocess": ("llmscale.prep.cli:main", "tools/preprocess_data.py"),
    "llmscale-convert": ("llmscale.checkpoint.cli:main", "tools/convert_checkpoint.py"),
    "llmscale-plan": ("llmscale.parallel.cli:main", "tools/plan.py"),
    "llmscale-bench": ("llmscale.bench.cli:main", "tools/bench.py"),
    "llmscale-evaluate": ("llmscale.eval.cli:main", "tools/evaluate.py"),
}


def test_pyproject_installs_each_command() -> None:
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {command: target for command, (target, _) in COMMANDS.items()}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_prints_its_help(command: str, capsys) -> None:
    module, _, function = COMMANDS[command][0].partition(":")
    main = getattr(importlib.import_module(module), function)
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    assert exit.value.code == 0
    # DeepSpeed may announce its accelerator on stdout as it is first imported.
    assert any(line.startswith("usage: ") for line in capsys.readouterr().out.splitlines())


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_the_tools_script_runs_the_same_main(command: str) -> None:
    target, script = COMMANDS[command]
    module = target.partition(":")[0]
    tree = ast.parse((REPO_ROOT / script).read_text())
    imports = [(node.module, [alias.name for alias in node.names])
               for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert (module, ["main"]) in imports
