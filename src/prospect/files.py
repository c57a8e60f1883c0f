"""Writing files so that nobody ever sees half of one, with the permissions a plain ``open()`` gives.

Every file ProSpect writes (concepts, checkpoints, images, exports, reports) goes through
:func:`atomic_write`: the bytes go to a temporary name in the same folder, are flushed to disk
(``fsync``), given the mode the user's umask gives new files (``mkstemp`` alone gives 0600, which a
colleague, a web server or a shared group cannot read), then renamed onto the target. A failure at
any point removes the temporary file and leaves the previous version of the target as it was.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file under the current umask (e.g. 0644)."""
    return 0o666 & ~_umask()


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)``, fsync the result, then rename it onto ``path``.

    Raises the ``OSError`` of whatever step failed; no temporary file is left behind.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the rename must not land before the bytes do
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """:func:`atomic_write` of ``data``."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write` of ``text`` as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def check_output_folder(folder: str | Path, what: str = "output folder") -> Path:
    """Refuse, before any work, a folder that exists as a file or that could not be created or written.

    Creates nothing: the folder is made by the first write (:func:`ensure_folder`).
    """
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise OSError(f"{what} {folder} exists and is not a folder; give a folder, or remove the file")
    probe = folder
    while not probe.exists():  # the nearest existing ancestor must be a writable folder
        probe = probe.parent
    if not probe.is_dir():
        raise OSError(f"cannot create {what} {folder}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        read_only = hasattr(os, "statvfs") and os.statvfs(probe).f_flag & os.ST_RDONLY
        why = "is on a read-only file system" if read_only else "is not writable (Permission denied)"
        raise OSError(f"cannot {'write to' if probe == folder else 'create'} {what} {folder}: {probe} {why}")
    return folder


def ensure_folder(folder: str | Path, what: str = "output folder") -> Path:
    """Create ``folder`` (and its parents), or say in one line why it cannot be."""
    folder = check_output_folder(folder, what)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create {what} {folder}: {err.strerror or err}") from err
    return folder


@contextmanager
def new_folders_undone_on_failure(folder: str | Path):
    """Around a job that may create ``folder``: if the job fails, the folders it created on the way are
    removed again while they are empty (a failed run leaves the disk as it found it)."""
    folder = Path(folder).expanduser()
    missing = []
    probe = folder
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)  # deepest first
        probe = probe.parent
    try:
        yield folder
    except BaseException:
        for made in missing:
            try:
                made.rmdir()  # only if it exists and is empty
            except OSError:
                break
        raise


def safe_name(text: str) -> str:
    """``text`` in the characters every file system, A1111 prompt and ComfyUI name take (letters, digits, - and
    _; other runs become one -), or "" when nothing is left."""
    import re

    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")
