"""The offline install bundle: the closure it picks, and a real round trip through a fresh venv."""

import importlib.metadata
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

from llmscale.wheelhouse import (
    Target,
    WheelhouseError,
    build_wheelhouse,
    platform_tags,
    read_installed,
    select_closure,
)

REPO = Path(__file__).resolve().parents[1]


def package(name, *requires):
    return {"metadata": {"name": name, "version": "1.0", "requires_dist": list(requires)}}


def test_platform_tags_add_every_older_manylinux_and_its_legacy_alias():
    tags = platform_tags("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64"
    assert tags[-2:] == ["manylinux_2_5_x86_64", "manylinux1_x86_64"]
    assert "manylinux2014_x86_64" in tags and "manylinux_2_29_x86_64" not in tags
    assert platform_tags("musllinux_1_2_aarch64") == ["musllinux_1_2_aarch64"]


def test_target_markers_follow_the_python_version_and_platform():
    environment = Target("3.12", "manylinux_2_28_aarch64").marker_environment()
    assert environment["python_version"] == "3.12"
    assert environment["python_full_version"] == "3.12.0"
    assert environment["platform_machine"] == "aarch64"
    assert environment["sys_platform"] == "linux"


@pytest.mark.parametrize(
    "python_version, platform, flag",
    [
        ("312", None, "--python-version"),
        ("3.12", "win_amd64", "--platform"),
        ("3.12", "macosx_14_0_arm64", "--platform"),
    ],
)
def test_target_rejects_what_pip_or_a_cluster_cannot_use(python_version, platform, flag):
    with pytest.raises(WheelhouseError, match=flag):
        Target(python_version, platform)


def test_closure_stops_at_excluded_packages_and_follows_markers_and_extras():
    report = {
        "install": [
            package(
                "llmscale", "torch>=2.5", "Hydra-Core", "datasets[http]", 'tomli; python_version < "3.11"'
            ),
            package("torch", "sympy", "filelock"),
            package("sympy"),
            package("filelock"),
            package("hydra-core", "omegaconf"),
            package("omegaconf"),
            package("datasets", "filelock", 'aiohttp; extra == "http"', 'pytest; extra == "test"'),
            package("aiohttp"),
            package("pytest"),
            package("tomli"),
        ]
    }

    def names(python_version):
        environment = Target(python_version).marker_environment()
        selected = select_closure(report, "llmscale", ["torch"], environment)
        return sorted(item["metadata"]["name"] for item in selected)

    # sympy is torch's alone; filelock is also datasets', so it travels.
    assert names("3.12") == ["aiohttp", "datasets", "filelock", "hydra-core", "llmscale", "omegaconf"]
    assert "tomli" in names("3.10")


def test_closure_names_a_requirement_missing_from_the_report():
    with pytest.raises(WheelhouseError, match="omegaconf"):
        report = {"install": [package("llmscale", "omegaconf")]}
        select_closure(report, "llmscale", [], Target().marker_environment())


def test_installed_list_reads_pip_freeze_and_bare_names(tmp_path):
    freeze = tmp_path / "freeze.txt"
    freeze.write_text(
        "# the cluster\nTorch==2.11.0+cu130\nnumpy==2.5.2  # pinned\n-e git+https://x/y#egg=z\n"
        "mylib @ file:///src/mylib\nscipy\n"
    )
    assert read_installed(freeze) == {"torch": "2.11.0", "numpy": "2.5.2", "mylib": None, "scipy": None}
    freeze.write_text("numpy>=2\n")
    with pytest.raises(WheelhouseError, match="freeze.txt:1"):
        read_installed(freeze)


def test_wheelhouse_refuses_a_folder_with_files(tmp_path):
    (tmp_path / "old.whl").write_text("")
    with pytest.raises(WheelhouseError, match="not empty"):
        build_wheelhouse(REPO, tmp_path)


def distribution_closure(name: str) -> set[str]:
    """`name` and what it requires, as installed in this environment."""
    seen, pending = set(), [name]
    while pending:
        current = canonicalize_name(pending.pop())
        if current in seen:
            continue
        seen.add(current)
        for text in importlib.metadata.distribution(current).requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return seen


def link_installed(names: set[str], folder: Path) -> None:
    """Symlink these installed distributions' files into `folder`: a stand-in for a cluster's
    own torch that copies nothing else of this environment."""
    folder.mkdir()
    for name in names:
        distribution = importlib.metadata.distribution(name)
        for top in {file.parts[0] for file in distribution.files} - {".."}:
            (folder / top).symlink_to(Path(distribution.locate_file(top)))


# The heaviest wheels (114 of 185 MiB): the simulated cluster has them, as it has torch, which
# keeps the round trip near two minutes and also exercises leaving out what the target has.
CLUSTER_HAS = ("torch", "numpy", "scipy", "pyarrow", "pandas")


@pytest.mark.slow
def test_fresh_venv_installs_llmscale_from_the_wheelhouse_with_no_index(tmp_path):
    installed = {name: importlib.metadata.version(name) for name in CLUSTER_HAS}
    wheels = build_wheelhouse(REPO, tmp_path / "wheelhouse", installed=installed)
    in_bundle = {canonicalize_name(parse_wheel_filename(wheel.name)[0]) for wheel in wheels}
    assert {"llmscale", "deepspeed", "megatron-core", "hydra-core", "antlr4-python3-runtime"} <= in_bundle
    assert not in_bundle & {"torch", "triton", "sympy", *CLUSTER_HAS}, in_bundle

    # The cluster: a bare venv that sees those packages, and what they alone need, nothing else.
    cluster = tmp_path / "cluster"
    venv.create(cluster, with_pip=True)
    has = set().union(*map(distribution_closure, CLUSTER_HAS)) - in_bundle
    link_installed(has, tmp_path / "cluster-has")
    (site_packages,) = cluster.glob("lib/python*/site-packages")
    (site_packages / "cluster_has.pth").write_text(str(tmp_path / "cluster-has") + "\n")

    python = str(cluster / "bin" / "python")
    # No pip configuration: this machine's names a folder of wheels that holds torch.
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("PIP_", "PYTHON"))}
    environment["PIP_CONFIG_FILE"] = os.devnull
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-compile", "--no-index",
         "--find-links", str(tmp_path / "wheelhouse"), "llmscale"],
        check=True, env=environment, cwd=tmp_path,
    )
    modules = ("llmscale", "deepspeed", "megatron.core", "hydra", "datasets", "wandb", "datasketch")
    script = f"import importlib\nfor m in {modules}: print('FROM', importlib.import_module(m).__file__)"
    printed = subprocess.run(
        [python, "-c", script],
        check=True, env=environment, cwd=tmp_path, capture_output=True, text=True,
    ).stdout
    paths = re.findall(r"^FROM (.*)$", printed, re.MULTILINE)
    assert len(paths) == len(modules) and all(path.startswith(str(site_packages)) for path in paths), printed
