"""Files written atomically: a crash or an interrupt leaves the old file or none, never half of one.

Every file actedit writes that a later run reads back (artifacts' metadata, activation shards and
manifests, training checkpoints, base completions, study scores and reports) goes through
:func:`write_atomic`: the bytes go to a temporary file beside the target (``.NAME.*.tmp``, a name
no reader looks for), are synced to disk, and replace the target with ``os.replace`` (atomic on
POSIX and Windows within one file system).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]

TEMP_SUFFIX = ".tmp"
"""The suffix of the temporary files :func:`write_atomic` leaves behind when killed."""


def write_atomic(path: PathLike, data: Union[bytes, str, Callable[[BinaryIO], Any]]) -> Path:
    """Write ``data`` to ``path`` atomically and return the path.

    Args:
        path: the target; its folder is created when missing.
        data: bytes, text (UTF-8), or a function that writes into the binary handle it is given
            (``lambda f: torch.save(obj, f)``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


@contextlib.contextmanager
def directory_atomic(directory: PathLike) -> Iterator[Path]:
    """Fill a directory atomically: yields a temporary sibling (``.NAME.partial-*``, shared like
    any directory), renamed to ``directory`` once the block ends without an error; an existing
    ``directory`` is replaced only then, and an error removes the temporary one. A reader sees
    the old directory, the new one or none, never half of one."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-", dir=directory.parent))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it private (0700)
    try:
        yield tmp
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            os.replace(directory, old / directory.name)
            try:
                os.replace(tmp, directory)
            except BaseException:
                os.replace(old / directory.name, directory)  # the old one back where it was
                shutil.rmtree(old, ignore_errors=True)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: PathLike, value: Any, *, indent: int = 1, **dumps: Any) -> Path:
    """:func:`write_atomic` of ``value`` as JSON (a trailing newline; extra ``json.dumps`` arguments
    such as ``default=float`` or ``sort_keys=True`` pass through)."""
    return write_atomic(path, json.dumps(value, indent=indent, **dumps) + "\n")


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


__all__ = ["TEMP_SUFFIX", "current_umask", "directory_atomic", "write_atomic", "write_json"]
