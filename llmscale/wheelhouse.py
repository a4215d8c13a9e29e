"""A folder of wheels from which llmscale installs with no network: the offline install bundle.

Every package llmscale needs, except torch and what only torch needs (a cluster keeps its own
CUDA build), for a target Python version and platform. pip resolves the dependency closure
(`pip install --dry-run --report`), and this module picks the wheels from that report:

1. llmscale itself is built as a wheel.
2. A resolution for this interpreter finds the packages published only as source (DeepSpeed,
   antlr4-python3-runtime): they are built here, with DeepSpeed's ops left for run time. Being
   pure Python (py3-none-any) they serve any target.
3. A resolution for the target, binary wheels only, finds those built wheels in the folder and
   everything else on the index. pip resolves for a foreign target only under
   `--only-binary=:all:`, hence step 2.
4. The closure is walked from llmscale, stopping at torch and at the packages the target
   already has; the wheels reached are downloaded (hash-checked) into the folder.
"""

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

# The cluster's CUDA build of torch stays; its own dependencies (nvidia-*, triton, sympy, ...)
# are left out unless something else in llmscale's closure needs them.
ALWAYS_EXCLUDED = ("torch",)

# Oldest glibc a manylinux_2_N tag can name; manylinux1/2010/2014 are aliases of 2_5/2_12/2_17.
OLDEST_GLIBC_MINOR = 5
LEGACY_MANYLINUX = {5: "manylinux1", 12: "manylinux2010", 17: "manylinux2014"}

# Building DeepSpeed's CUDA/C++ ops is left to the first run that needs one, as in `make setup`.
BUILD_ENV = {"DS_BUILD_OPS": "0"}


class WheelhouseError(ValueError):
    """A request the wheelhouse cannot serve, with the fix in its message."""


@dataclass(frozen=True)
class Target:
    """The interpreter the wheels are for; None fields mean this machine's."""

    python_version: str | None = None
    platform: str | None = None

    def __post_init__(self):
        if self.python_version is not None and not re.fullmatch(r"3\.\d+(\.\d+)?", self.python_version):
            raise WheelhouseError(
                f"--python-version {self.python_version!r}: give a dotted CPython version, e.g. 3.12"
            )
        if self.platform is not None and not re.match(r"(many|musl)?linux_", self.platform):
            raise WheelhouseError(
                f"--platform {self.platform!r}: give a Linux wheel platform tag, "
                "e.g. manylinux_2_28_x86_64 (the clusters llmscale runs on are Linux)"
            )

    @property
    def is_local(self) -> bool:
        return self.python_version is None and self.platform is None

    def pip_args(self) -> list[str]:
        """pip's options that resolve for this target (binary wheels only, as pip requires)."""
        if self.is_local:
            return []
        args = ["--only-binary=:all:"]
        if self.python_version:
            args += ["--python-version", self.python_version]
        for tag in platform_tags(self.platform) if self.platform else ():
            args += ["--platform", tag]
        return args

    def marker_environment(self) -> dict[str, str]:
        """The values environment markers (`python_version < "3.12"`, ...) take on the target."""
        environment = dict(default_environment())
        if self.python_version:
            parts = self.python_version.split(".")
            environment["python_version"] = ".".join(parts[:2])
            environment["python_full_version"] = ".".join((parts + ["0"])[:3])
            environment["implementation_version"] = environment["python_full_version"]
        if self.platform:
            environment.update(
                sys_platform="linux",
                platform_system="Linux",
                os_name="posix",
                platform_machine=re.sub(r"^.*?linux(_\d+_\d+|\d+)?_", "", self.platform),
            )
        return environment


def platform_tags(platform: str) -> list[str]:
    """`platform` and every older manylinux tag a system of its glibc runs: pip matches each
    --platform exactly, so manylinux_2_28 alone would miss the many manylinux2014 wheels."""
    match = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if not match:
        return [platform]
    newest, arch = int(match.group(1)), match.group(2)
    tags = []
    for minor in range(newest, OLDEST_GLIBC_MINOR - 1, -1):
        tags.append(f"manylinux_2_{minor}_{arch}")
        if minor in LEGACY_MANYLINUX:
            tags.append(f"{LEGACY_MANYLINUX[minor]}_{arch}")
    return tags


def read_installed(path: Path) -> dict[str, str | None]:
    """Packages the target already has, from `pip freeze` output or one name a line:
    name -> version (None where only the name is given). Local labels (2.11.0+cu130) are
    dropped so the index's release of that version stands in for it when resolving."""
    installed: dict[str, str | None] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:==\s*([^\s;+]+)\S*|\s@\s.*)?", line)
        if not match:
            raise WheelhouseError(
                f"{path}:{number}: {line!r} is neither NAME, NAME==VERSION nor NAME @ URL "
                "(give the target's `pip freeze` output or one package name a line)"
            )
        installed[canonicalize_name(match.group(1))] = match.group(2)
    return installed


def select_closure(
    report: dict, root: str, excluded: Iterable[str], environment: dict, root_extras: Iterable[str] = ()
) -> list[dict]:
    """The report's packages reachable from `root` through requirements whose markers hold on
    the target, not passing through an excluded package (the target has those, and theirs)."""
    items = {canonicalize_name(item["metadata"]["name"]): item for item in report["install"]}
    excluded = {canonicalize_name(name) for name in excluded}
    walked_extras: dict[str, set[str]] = {}
    pending = [(canonicalize_name(root), set(root_extras))]
    while pending:
        name, extras = pending.pop()
        if name in excluded or (name in walked_extras and extras <= walked_extras[name]):
            continue
        if name not in items:
            raise WheelhouseError(f"{name} is required but absent from pip's resolution report")
        walked = walked_extras.setdefault(name, set())
        walked |= extras
        for text in items[name]["metadata"].get("requires_dist", []):
            requirement = Requirement(text)
            if requirement.marker is None or any(
                requirement.marker.evaluate({**environment, "extra": extra}) for extra in {"", *walked}
            ):
                pending.append((canonicalize_name(requirement.name), set(requirement.extras)))
    return [items[name] for name in walked_extras]


def build_wheelhouse(
    project: Path,
    out: Path,
    target: Target = Target(),
    *,
    extras: Iterable[str] = (),
    installed: dict[str, str | None] | None = None,
    exclude: Iterable[str] = (),
    pins: dict[str, str | None] | None = None,
) -> list[Path]:
    """Write into the new or empty folder `out` the wheels of `project` (llmscale's source
    tree, with its `extras`) and of everything it needs, except torch and the packages the
    target has: `installed` (name -> version, or None where unknown) and `exclude`. Where
    they fit, versions follow `installed`, then `pins`. Returns the wheels."""
    installed, extras = installed or {}, sorted(extras)
    out = out.resolve()
    if out.exists() and any(out.iterdir()):
        raise WheelhouseError(f"{out} is not empty: remove it or name a new folder")
    out.mkdir(parents=True, exist_ok=True)
    project_wheel = _build_wheels(out, [str(project.resolve())])[0]
    project_name = canonicalize_name(parse_wheel_filename(project_wheel.name)[0])
    requirement = f"{project_wheel}[{','.join(extras)}]" if extras else str(project_wheel)
    excluded = {canonicalize_name(name) for name in (*ALWAYS_EXCLUDED, *installed, *exclude)} - {project_name}
    versions = {name: version for name, version in {**(pins or {}), **installed}.items() if version}
    with tempfile.TemporaryDirectory() as scratch:
        constraints = Path(scratch, "constraints.txt")
        pinned = (f"{name}=={version}\n" for name, version in versions.items() if name != project_name)
        constraints.write_text("".join(pinned))
        here = _resolve(requirement, out, Target(), constraints if target.is_local else None)
        _build_source_only(here, out, excluded, target)
        report = here if target.is_local else _resolve(requirement, out, target, constraints)
    selected = select_closure(report, project_name, excluded, target.marker_environment(), extras)
    # Wheels already in `out` are llmscale's and those built from source.
    to_download = [
        item for item in selected if _url(item).endswith(".whl") and not _url(item).startswith(out.as_uri())
    ]
    if to_download:
        urls = map(_hashed_url, to_download)
        _pip("download", "--no-deps", "--quiet", "--dest", str(out), *target.pip_args(), *urls)
    return _keep_only(out, {canonicalize_name(item["metadata"]["name"]) for item in selected})


def versions_here() -> dict[str, str]:
    """The packages of this environment (the versions the tests ran with), as pins."""
    return {
        canonicalize_name(distribution.metadata["Name"]): distribution.version.split("+")[0]
        for distribution in importlib.metadata.distributions()
    }


def _pip(*args: str, env: dict | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, env={**os.environ, **(env or {})})


def _build_wheels(out: Path, requirements: list[str]) -> list[Path]:
    """Without build isolation, so that nothing is fetched to build: DeepSpeed's setup imports
    torch, and llmscale's and antlr4's need setuptools, which this environment has. pip's cache
    may serve a wheel built before, by `make setup` for one: a DeepSpeed built with its ops
    would carry this machine's platform tag, which `_build_source_only` refuses for another."""
    before = set(out.glob("*.whl"))
    _pip("wheel", "--no-deps", "--no-build-isolation", "--quiet", "--wheel-dir", str(out),
         *requirements, env=BUILD_ENV)
    return sorted(set(out.glob("*.whl")) - before)


def _resolve(requirement: str, out: Path, target: Target, constraints: Path | None) -> dict:
    """pip's resolution of `requirement` for `target`, as its installation report."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch, "report.json")
        _pip("install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
             "--find-links", str(out), *target.pip_args(),
             *(["--constraint", str(constraints)] if constraints else []), requirement)
        return json.loads(report.read_text())


def _build_source_only(report: dict, out: Path, excluded: set[str], target: Target) -> None:
    """Build the wheels of the packages the index has only as source."""
    wanted = [
        f'{item["metadata"]["name"]}=={item["metadata"]["version"]}'
        for item in report["install"]
        if not _url(item).endswith(".whl") and canonicalize_name(item["metadata"]["name"]) not in excluded
    ]
    if not wanted:
        return
    for wheel in _build_wheels(out, wanted):
        platforms = {tag.platform for tag in parse_wheel_filename(wheel.name)[3]}
        if not target.is_local and platforms != {"any"}:
            raise WheelhouseError(
                f"{wheel.name}: the index has only its source, and it builds here for this machine "
                f"alone, not for {target}; build the wheelhouse on a machine like the target"
            )


def _url(item: dict) -> str:
    return item["download_info"]["url"]


def _hashed_url(item: dict) -> str:
    """The wheel's address with its hash, which pip checks after downloading."""
    hashes = item["download_info"].get("archive_info", {}).get("hashes", {})
    return f'{_url(item)}#sha256={hashes["sha256"]}' if "sha256" in hashes else _url(item)


def _keep_only(out: Path, names: set[str]) -> list[Path]:
    """Remove wheels built along the way that the target's resolution did not choose."""
    kept = []
    for wheel in sorted(out.glob("*.whl")):
        if canonicalize_name(parse_wheel_filename(wheel.name)[0]) in names:
            kept.append(wheel)
        else:
            wheel.unlink()
    missing = names - {canonicalize_name(parse_wheel_filename(wheel.name)[0]) for wheel in kept}
    if missing:
        raise WheelhouseError(f"no wheel came for {', '.join(sorted(missing))}")
    return kept
