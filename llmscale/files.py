"""Writing files so that a reader, or a process killed midway, never sees half of one."""

import os
from pathlib import Path


def write_text_atomically(path: Path, text: str) -> None:
    """Write beside `path`, then rename over it: the rename is atomic on POSIX filesystems."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)
