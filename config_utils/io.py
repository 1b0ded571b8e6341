"""Atomic outputs and the manifest.json that each step writes beside them."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from config_utils.errors import PipelineError

MANIFEST = "manifest.json"


def _process_umask() -> int:
    umask = os.umask(0)  # os.umask is the only portable way to read it: set, then put back at once
    os.umask(umask)
    return umask


# What open() gives a new file (0644 under the usual umask 022); read once, at import, before any threads.
DEFAULT_FILE_MODE = 0o666 & ~_process_umask()


def use_default_file_modes(folder: str | Path) -> None:
    """Give every file under folder the mode a plain open() would.

    safetensors writes its files 0600, so other users sharing the run folder could not read the weights.
    """
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(DEFAULT_FILE_MODE)


def check_output_folder(path: str | Path, key: str) -> Path:
    """An output folder must be a folder (or not exist yet) below folders: one line naming the key if not."""
    path = Path(path)
    for part in [path, *path.parents]:
        if part.exists() and not part.is_dir():
            raise PipelineError(
                f"{key}={str(path)!r}: {part} is a file, not a folder; remove it or choose another path for {key}"
            )
    return path


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old|deleting)-(?P<pid>\d+)$")  # .NAME.tmp-PID and the like


def remove_stale_temporaries(parent: Path, name: str | None = None) -> None:
    """Temporaries (of `name`, or of any name) in parent whose writer has died: an interrupted write's leftovers."""
    for path in parent.glob(".*"):
        match = TEMPORARY.match(path.name)
        if not match or name is not None and match["name"] != name:
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and not _process_alive(pid):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC, also when a library (safetensors, pyarrow) wraps it in its own exception type."""
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def human_size(n_bytes: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n_bytes < 1024 or unit == "GB":
            return f"{n_bytes:.0f} {unit}" if unit == "bytes" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024


def disk_full_message(final_dir: Path, written: int) -> str:
    """What filled, what is free, and a lower bound of what the output needs (what was written, or the previous
    output's size when that is larger: a rerun writes about as much)."""
    previous = folder_size(final_dir) if final_dir.is_dir() else 0
    needed = max(written, previous)
    free = shutil.disk_usage(final_dir.parent).free
    kept = f"; the previous {final_dir} is intact" if final_dir.exists() else ""
    return (
        f"no space left on the device holding {final_dir.parent}: the disk filled after {human_size(written)} of "
        f"{final_dir.name} ({human_size(free)} free now) and needs at least {human_size(needed)}: free space "
        f"there or choose another output folder, and run again{kept}"
    )


class OutputLock:
    """An exclusive, non-blocking POSIX lock on parent/.NAME.lock for the one process writing output NAME; a
    second writer gets one line naming the holder's PID. The kernel drops it when the process dies (no stale
    locks after a kill -9), and it belongs to the process (a step run twice in one process does not lock itself
    out). Held until release() or the end of the step (config_utils.cli.run_step releases every lock), which
    also removes the file, so a step that stops leaves nothing behind."""

    def __init__(self, output: str | Path, busy: str):
        """busy: the refusal, with "{pid}" where the holder's PID goes."""
        output = Path(output)
        self.path = output.parent / f".{output.name}.lock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            self._handle = open(self.path, "a+", encoding="utf-8")
            try:
                fcntl.lockf(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # EACCES or EAGAIN: another process holds it
                self._handle.seek(0)
                holder = self._handle.read().strip() or "unknown"
                self._handle.close()
                raise PipelineError(busy.format(pid=holder)) from None
            if self._is_current():
                break
            self._handle.close()  # its holder removed the file between our open and lock: lock the new one
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(f"{os.getpid()}\n")
        self._handle.flush()
        _HELD_LOCKS.append(self)

    def _is_current(self) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(self._handle.fileno()).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if not self._handle.closed:
            if self._is_current():
                self.path.unlink()  # while still locked: the next writer opens a new file, never this one
            fcntl.lockf(self._handle, fcntl.LOCK_UN)
            self._handle.close()


_HELD_LOCKS: list[OutputLock] = []  # a lock lives as long as its open file: held here until the step ends


def release_output_locks() -> None:
    """Release every lock this process took (the end of a step), removing their files."""
    while _HELD_LOCKS:
        _HELD_LOCKS.pop().release()


def lock_step_output(output: str | Path, key: str) -> OutputLock:
    """Lock a step's output folder until the step ends; key: the option or config key naming it."""
    return OutputLock(
        output,
        f"{output} is being written by another process (PID {{pid}}) running this step: wait for it to finish, "
        f"stop it, or choose another {key}",
    )


@contextlib.contextmanager
def atomic_dir(final_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces final_dir, on failure it is removed.

    An interrupted step therefore never leaves a folder that looks complete; a full disk becomes one line.
    """
    final_dir = check_output_folder(final_dir, "the output folder")
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final_dir.parent, final_dir.name)
    tmp_dir = final_dir.parent / f".{final_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    try:
        yield tmp_dir
    except BaseException as error:
        disk_full = is_disk_full(error)
        written = folder_size(tmp_dir) if disk_full else 0  # measured before the temporary goes
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if disk_full:
            raise PipelineError(disk_full_message(final_dir, written)) from None
        raise
    old_dir = final_dir.parent / f".{final_dir.name}.old-{os.getpid()}"
    if final_dir.exists():
        os.replace(final_dir, old_dir)
    os.replace(tmp_dir, final_dir)
    shutil.rmtree(old_dir, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on failure removed.

    The one atomic writer for single files (JSON, text, figures, arrays): readers see the old file or the
    new one, never half of one. The temporary is `.NAME.tmp-PID` (ignored by git, swept by atomic_dir)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        yield tmp_path
        os.chmod(tmp_path, DEFAULT_FILE_MODE)  # some writers (mkstemp, safetensors) make files 0600
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_file(path) as tmp_path:
        tmp_path.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


# ---- content hashes: what a step wrote is checked byte for byte by the step that reads it ----------------------------

FILE_HASHES = "file_sha256"  # manifest key: relative path -> SHA-256 of each file the step wrote
SELF_HASH = "manifest_sha256"  # manifest key: SHA-256 of the manifest's own content (without this key)


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _content_sha256(manifest: dict) -> str:
    content = {key: value for key, value in manifest.items() if key != SELF_HASH}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def write_sealed_manifest(folder: str | Path, manifest: dict, files: list[str] | None = None) -> Path:
    """Write folder/manifest.json with the SHA-256 of `files` (paths relative to folder; None: every file under
    folder) and of the manifest itself, so a reader can tell damaged or hand-edited outputs from the real ones."""
    folder = Path(folder)
    if files is None:
        files = sorted(
            str(path.relative_to(folder))
            for path in folder.rglob("*")
            if path.is_file() and path.name != MANIFEST and not TEMPORARY.match(path.name)
        )
    manifest = {**manifest, FILE_HASHES: {name: file_sha256(folder / name) for name in files}}
    # a JSON round trip first: the self-hash must be of what a reader will parse (tuples become lists, paths text)
    manifest = json.loads(json.dumps(manifest, default=str))
    return write_json_atomic(folder / MANIFEST, {**manifest, SELF_HASH: _content_sha256(manifest)})


def check_manifest_seal(path: Path, manifest: dict, run_first: str) -> None:
    """A manifest whose content no longer matches its own hash was edited by hand or damaged (absent: older run)."""
    if SELF_HASH in manifest and manifest[SELF_HASH] != _content_sha256(manifest):
        raise PipelineError(
            f"{path} was edited or damaged after it was written (its content no longer matches its "
            f"{SELF_HASH}): run `{run_first}` again rather than editing it"
        )


def check_file_hashes(folder: str | Path, manifest: dict, run_first: str) -> None:
    """Every file the manifest lists is there with the bytes it was written with."""
    folder = Path(folder)
    for name, digest in manifest.get(FILE_HASHES, {}).items():
        path = folder / name
        if not path.is_file():
            raise PipelineError(f"{path} is missing (its {MANIFEST} lists it): run `{run_first}` again")
        if file_sha256(path) != digest:
            raise PipelineError(
                f"{path} is damaged or was replaced: its SHA-256 differs from the one recorded in "
                f"{folder / MANIFEST} when it was written; run `{run_first}` again"
            )


def read_manifest(folder: str | Path, run_first: str) -> tuple[dict, str]:
    """Return (manifest, its hash), checked against its own hash and its files' hashes; a missing, broken, edited
    or damaged one names the command to run first."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise PipelineError(f"{path} not found: run `{run_first}` first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PipelineError(f"{path} is corrupt: run `{run_first}` again") from None
    if not isinstance(manifest, dict):
        raise PipelineError(f"{path} is corrupt (not a JSON object): run `{run_first}` again")
    check_manifest_seal(path, manifest, run_first)
    check_file_hashes(folder, manifest, run_first)
    return manifest, manifest_hash(manifest)


# how long a step took does not change what it made: rerunning a step on the same input keeps its hash. Nor do the
# files' bytes, which carry more than the content (datasets' state.json has a fingerprint of its input files'
# modification times), nor the self-hash, which covers the seconds
VOLATILE_MANIFEST_KEYS = {"seconds", FILE_HASHES, SELF_HASH}


def manifest_hash(manifest: dict) -> str:
    """The hash later steps record of an input: its manifest's content, without the timing."""
    content = {key: value for key, value in manifest.items() if key not in VOLATILE_MANIFEST_KEYS}
    text = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def current_manifest_hash(folder: str | Path) -> str | None:
    """The hash of the manifest now in folder, or None when there is none (or it is unreadable)."""
    try:
        return manifest_hash(json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def safe_file_stem(label: str) -> str:
    """A file name for a label from the data (a topic): letters, digits, '_' and '-' only, never a path.

    A label that had to change gets a short hash of itself, so 'Sci/Tech' and 'Sci_Tech' stay two files.
    """
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", label)[:60] or "_"
    if stem != label:
        stem += "-" + hashlib.blake2b(label.encode("utf-8"), digest_size=4).hexdigest()
    return stem


def safe_file_stems(labels: list[str], what: str) -> dict[str, str]:
    """label -> its file stem, refusing the (unlikely) case that two labels would share one."""
    stems = {label: safe_file_stem(label) for label in dict.fromkeys(labels)}
    if len(set(stems.values())) < len(stems):
        raise PipelineError(f"{what} {list(stems)} would share a file name ({sorted(stems.values())}); rename one")
    return stems
