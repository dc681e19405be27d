"""Files written whole or not at all: each through a temporary file beside it, renamed into place once on disk.

Checkpoints and run files, exports, predictions with their n-best lists, teacher targets and the feature
cache's index are written this way, so that a reader (or a crash half-way) never meets half a file.
"""
from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write through a temporary file in the same directory, then rename it into place, so a reader
    (or a crash half-way) never leaves half a file under `path`. An OSError names `path`."""
    atomic_write_files({path: write})


def atomic_write_files(files: dict[str | os.PathLike, Callable[[IO[bytes]], None]]) -> None:
    """Write files that belong together (a model directory, predictions with their n-best lists)
    whole or not at all: each goes to a temporary file beside it, and only once every one of them
    is on disk are they renamed into place. A failed write (a full disk) replaces none of them, and
    its OSError names the file being written, not its temporary name. A path that is a symlink is
    written through to its target (the rename would otherwise replace the link with a plain file)."""
    written: list[tuple[Path, Path]] = []
    try:
        for target, write in files.items():
            path = Path(os.path.realpath(target)) if Path(target).is_symlink() else Path(target)
            temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
            written.append((temp, path))
            try:
                # os.open with mode 0o666 lets the user's umask decide the final permissions, as for a plain open().
                with os.fdopen(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as file:
                    write(file)
                    file.flush()
                    os.fsync(file.fileno())  # the data is on disk before the name points at it
            except OSError as error:
                if error.filename not in (None, str(temp)):
                    raise  # about another file (a source being copied): it names that one
                raise OSError(error.errno, error.strerror or str(error), str(target)) from None
        for temp, path in written:
            os.replace(temp, path)
    except BaseException:
        for temp, _path in written:
            temp.unlink(missing_ok=True)
        raise
