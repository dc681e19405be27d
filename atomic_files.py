"""Files written whole or not at all: each through a temporary file beside it, renamed into place once on disk.

Checkpoints and run files, exports, predictions with their n-best lists, teacher targets and the feature
cache's index are written this way, so that a reader (or a crash half-way) never meets half a file.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

logger = logging.getLogger("korquad")


# atomic_write names its temporary files `.{name}.{pid}.{random hex}.tmp` (temp_path_for).
TEMP_FILE = re.compile(r"\.(.+)\.(\d+)\.[0-9a-f]+\.tmp")


def temp_path_for(path: Path) -> Path:
    """A temporary file's name beside `path`, which `remove_dead_temp_files` knows by its writer's pid."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write through a temporary file in the same directory, then rename it into place, so a reader
    (or a crash half-way) never leaves half a file under `path`. An OSError names `path`."""
    atomic_write_files({path: write})


def writes_through(path: str | os.PathLike) -> bool:
    """Whether `path` exists and is neither a regular file nor a directory: a device (/dev/null), a FIFO,
    /dev/stdout on a pipe. A rename would replace it with a plain file, so it is written straight through."""
    try:
        mode = os.stat(path).st_mode   # through symlinks: /dev/stdout is one
    except OSError:
        return False   # missing (created by the rename) or unreadable (the write names the error)
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


@contextlib.contextmanager
def errors_named(target: str | os.PathLike, written: str | os.PathLike) -> Iterator[None]:
    """An OSError about `written` (the file actually opened) re-raised naming `target`, the file asked for."""
    try:
        yield
    except OSError as error:
        if error.filename not in (None, str(written)):
            raise  # about another file (a source being copied): it names that one
        raise OSError(error.errno, error.strerror or str(error), str(target)) from None


def atomic_write_files(files: dict[str | os.PathLike, Callable[[IO[bytes]], None]]) -> None:
    """Write files that belong together (a model directory, predictions with their n-best lists)
    whole or not at all: each goes to a temporary file beside it, and only once every one of them
    is on disk are they renamed into place. A failed write (a full disk) replaces none of them, and
    its OSError names the file being written, not its temporary name. A path that is a symlink is
    written through to its target (the rename would otherwise replace the link with a plain file);
    a device or FIFO (`writes_through`) is written straight through, after the temporary files."""
    written: list[tuple[Path, Path]] = []
    through = {target: write for target, write in files.items() if writes_through(target)}
    try:
        for target, write in files.items():
            if target in through:
                continue
            path = Path(os.path.realpath(target)) if Path(target).is_symlink() else Path(target)
            temp = temp_path_for(path)
            written.append((temp, path))
            # os.open with mode 0o666 lets the user's umask decide the final permissions, as for a plain open().
            with errors_named(target, temp), os.fdopen(
                    os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as file:
                write(file)
                file.flush()
                os.fsync(file.fileno())  # the data is on disk before the name points at it
        for target, write in through.items():   # no fsync: a pipe or device has no disk to wait for
            with errors_named(target, target), open(target, "wb") as file:
                write(file)
        for temp, path in written:
            os.replace(temp, path)
    except BaseException:
        for temp, _path in written:
            # A read-only mount refuses even the unlink of a missing file: the error being raised is the one to see.
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)
        raise


def save_torch_atomic(obj, path: Path) -> None:
    """torch.save through a temporary file and a rename: `path` is never half-written."""
    import torch  # here, so that a torch-less reader can use this module

    atomic_write(path, lambda file: torch.save(obj, file))


def json_bytes(obj) -> bytes:
    """Indented UTF-8 JSON (Korean unescaped), as the toolkit writes its JSON files."""
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def write_json_atomic(obj, path: Path) -> None:
    """Indented UTF-8 JSON (Korean unescaped), written atomically."""
    data = json_bytes(obj)
    atomic_write(path, lambda file: file.write(data))


def pid_is_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, it is just someone else's
        return True
    return True


def remove_dead_temp_files(directory: Path, name: str | None = None) -> list[Path]:
    """Delete the temporary files a killed process left in `directory` (of the file `name` only, if given): up to
    a whole checkpoint or all the answers so far each. Only those whose writer is dead go: another run may be
    writing into the same directory right now."""
    removed = []
    for path in directory.glob(".*.tmp"):
        match = TEMP_FILE.fullmatch(path.name)
        if match and (name is None or match.group(1) == name) and path.is_file() \
                and not pid_is_alive(int(match.group(2))):
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        logger.info("removed %d temporary file(s) of a killed run in %s", len(removed), directory)
    return removed
