"""Atomic outputs and the manifest.json that each step writes beside them."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from config_utils.errors import PipelineError

MANIFEST = "manifest.json"


@contextlib.contextmanager
def atomic_dir(final_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces final_dir, on failure it is removed.

    An interrupted step therefore never leaves a folder that looks complete.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = final_dir.parent / f".{final_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    try:
        yield tmp_dir
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    old_dir = final_dir.parent / f".{final_dir.name}.old-{os.getpid()}"
    if final_dir.exists():
        os.replace(final_dir, old_dir)
    os.replace(tmp_dir, final_dir)
    shutil.rmtree(old_dir, ignore_errors=True)


def write_json_atomic(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp_path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp_path, path)
    return path


def file_hash(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def read_manifest(folder: str | Path, run_first: str) -> tuple[dict, str]:
    """Return (manifest, its hash); a missing or broken one names the command to run first."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise PipelineError(f"{path} not found: run `{run_first}` first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PipelineError(f"{path} is corrupt: run `{run_first}` again") from None
    return manifest, file_hash(path)
