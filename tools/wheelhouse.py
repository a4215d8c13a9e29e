"""Write the offline install bundle: every wheel llmscale needs beyond torch, in one folder.

    python tools/wheelhouse.py OUT [--python-version 3.12] [--platform manylinux_2_28_x86_64]
        [--extras hf ...] [--installed FILE] [--exclude NAME ...] [--tested-versions]

Then, on a machine with no network that has torch:
    pip install --no-index --find-links OUT llmscale

Without --python-version/--platform the wheels are for this interpreter and machine.
--installed FILE (the target's `pip freeze`, or one package name a line) and --exclude leave out
packages the target already has; pinned versions in FILE are resolved against, so the rest
fits them. --tested-versions takes, where they fit, the versions installed beside this script's
interpreter (those the tests ran with) rather than the newest. llmscale/wheelhouse.py says how
the closure is found.
"""

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

if importlib.util.find_spec("llmscale") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmscale.wheelhouse import (  # noqa: E402
    Target,
    WheelhouseError,
    build_wheelhouse,
    read_installed,
    versions_here,
)

MiB = 2**20


def main(argv) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="new or empty folder for the wheels")
    parser.add_argument("--python-version", help="target CPython, e.g. 3.12 (default: this one)")
    parser.add_argument(
        "--platform", help="target wheel platform tag, e.g. manylinux_2_28_x86_64 (default: this machine's)"
    )
    parser.add_argument("--extras", nargs="+", default=[], metavar="EXTRA", help="llmscale's extras, e.g. hf")
    parser.add_argument(
        "--installed", type=Path, help="the target's `pip freeze`, or one package name a line: left out"
    )
    parser.add_argument(
        "--exclude", nargs="+", default=[], metavar="NAME", help="more packages the target has: left out"
    )
    parser.add_argument("--tested-versions", action="store_true", help="prefer the versions installed here")
    args = parser.parse_args(argv)
    try:
        target = Target(args.python_version, args.platform)
        installed = read_installed(args.installed) if args.installed else {}
        wheels = build_wheelhouse(
            Path(__file__).resolve().parents[1], args.out, target, extras=args.extras, installed=installed,
            exclude=args.exclude, pins=versions_here() if args.tested_versions else None,
        )
    except WheelhouseError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as error:
        print(f"error: pip failed (exit {error.returncode}), its message is above", file=sys.stderr)
        return 1
    except FileNotFoundError as error:
        print(f"error: {error.filename}: no such file", file=sys.stderr)
        return 2
    for wheel in wheels:
        print(f"{wheel.stat().st_size / MiB:8.2f} MiB  {wheel.name}")
    total = sum(wheel.stat().st_size for wheel in wheels) / MiB
    print(f"{total:8.2f} MiB  {len(wheels)} wheels in {args.out}")
    requirement = f"'llmscale[{','.join(args.extras)}]'" if args.extras else "llmscale"
    print(f"install with no network: pip install --no-index --find-links {args.out} {requirement}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
