"""A checkpoint's manifest: every file's size and SHA-256, so a resume can tell a complete,
intact checkpoint from a truncated or corrupted one."""

import hashlib
import json
from pathlib import Path
from typing import Dict, Optional

from llmscale.files import write_text_atomically

MANIFEST_FILE = "manifest.json"
_CHUNK = 16 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(step_dir: Path) -> None:
    """Lists every file under `step_dir` (written last, atomically)."""
    files: Dict[str, Dict[str, object]] = {}
    for path in sorted(p for p in step_dir.rglob("*") if p.is_file()):
        files[str(path.relative_to(step_dir))] = {
            "bytes": path.stat().st_size, "sha256": sha256_of(path)
        }
    write_text_atomically(step_dir / MANIFEST_FILE, json.dumps({"files": files}, indent=1))


def manifest_problem(step_dir: Path, checksums: bool) -> Optional[str]:
    """Why `step_dir` cannot be trusted, or None if every listed file is present and intact.
    Files added after the manifest (a cached universal conversion) are not checked."""
    manifest = step_dir / MANIFEST_FILE
    if not manifest.is_file():
        return f"it has no {MANIFEST_FILE}"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as error:
        return f"its {MANIFEST_FILE} is unreadable ({error})"
    for name, expected in files.items():
        path = step_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {expected['bytes']}"
        if checksums and sha256_of(path) != expected["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest (corrupted)"
    return None
