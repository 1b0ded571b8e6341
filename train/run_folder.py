"""A run folder's name, its one writer, a fresh folder for every new run, and the code that wrote it.

A run folder train.save_path/<tag>/ belongs to one training process at a time: lock_run_folder holds an
exclusive POSIX lock on save_path/.<tag>.lock (the kernel drops it when the process dies, so a killed run
never leaves a stale lock; it belongs to the process, so a step run twice in one process does not lock
itself out) and writes its PID there for the next writer's error message.

A new run (no --resume) starts from an empty folder. An existing one is refused unless --overwrite is
given; then it is moved aside to save_path/.<tag>.old-<PID>, kept intact until the new run has written
its model, and deleted only then. Checkpoints of an earlier run can therefore never be pruned into, resumed
from, or mistaken for the new run's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from config_utils import PipelineError
from config_utils.contracts import CHECKPOINT_DIR, MODEL_DIR
from config_utils.io import OutputLock, remove_stale_temporaries


def run_dir_for(save_path: str, tag: str) -> Path:
    if not re.fullmatch(r"[\w.-]+", tag):
        raise PipelineError(f"--tag {tag!r}: use letters, digits, '.', '-' and '_' only (it names a folder)")
    return Path(save_path) / tag


def lock_run_folder(save_path: str | Path, tag: str) -> OutputLock:
    """The lock of run folder save_path/<tag> (save_path/.<tag>.lock), held by its one training process."""
    return OutputLock(
        Path(save_path) / tag,
        f"run {Path(save_path) / tag} is being written by another training process (PID {{pid}}): wait for it to "
        f"finish, stop it, or pick another --tag",
    )


def describe_run(run_dir: Path) -> str:
    """What an existing run folder holds, in words, for the refusal message."""
    checkpoints = sorted((run_dir / CHECKPOINT_DIR).glob("step-*")) if (run_dir / CHECKPOINT_DIR).is_dir() else []
    if (run_dir / MODEL_DIR).is_dir():
        return "a finished run"
    if checkpoints:
        return f"an unfinished run (checkpoints up to {checkpoints[-1].name})"
    return "files of an earlier run"


def start_run_folder(run_dir: Path, overwrite: bool, resume: bool, command: str) -> Path | None:
    """Make run_dir ready for this run; return where an overwritten run was moved aside (None if nothing was).

    command: step 3's command line for this tag, for the hints (without --resume/--overwrite).
    """
    if overwrite and resume:
        raise PipelineError("--overwrite starts the run again and --resume continues it: pass one of them")
    in_use = run_dir.is_dir() and any(run_dir.iterdir())
    if resume or not in_use:
        run_dir.mkdir(parents=True, exist_ok=True)
        return None
    if not overwrite:
        raise PipelineError(
            f"run {run_dir} already holds {describe_run(run_dir)}: continue it with "
            f"`{command} --resume latest`, replace it with `{command} --overwrite`, or pick another "
            f"--tag"
        )
    aside = run_dir.parent / f".{run_dir.name}.old-{os.getpid()}"
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(run_dir, aside)  # atomic: the old run stays whole, just out of the way, until this one finishes
    run_dir.mkdir()
    return aside


def finish_run_folder(run_dir: Path, aside: Path | None) -> None:
    """The new run wrote its model: the run it replaced can go (also one set aside by an interrupted start)."""
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    remove_stale_temporaries(run_dir.parent, run_dir.name)


def git_state() -> dict:
    """{"commit": HEAD, "dirty": whether `git status --porcelain` lists anything} of this code; None values
    outside a git checkout (the commit alone does not say what ran when the tree had changes)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent, timeout=10
        ).stdout

    try:
        return {"commit": git("rev-parse", "HEAD").strip(), "dirty": bool(git("status", "--porcelain").strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
